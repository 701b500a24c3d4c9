/* Linked first into every compiled solution. Its .preinit_array entry runs before any of the
 * solution's own initialisers and adds a seccomp filter that forbids exec from then on: the
 * supervisor's policy lets the test's process exec exactly one binary, this one, and nothing
 * after that. It also makes the process non-dumpable (exec made it dumpable again): a crash
 * dumps no core and runs no crash handler of the host's. Outside the sandbox (a user running
 * the binary by hand) it only denies exec and core dumps. */
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#if defined(__x86_64__)
#define RLEF_AUDIT_ARCH AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define RLEF_AUDIT_ARCH AUDIT_ARCH_AARCH64
#endif

static void rlef_exec_guard(int argc, char** argv, char** envp) {
  (void)argc, (void)argv, (void)envp;
#ifdef RLEF_AUDIT_ARCH
  struct sock_filter filter[] = {
      BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, RLEF_AUDIT_ARCH, 1, 0),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
      BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_execve, 2, 0),
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_execveat, 1, 0),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
  };
  struct sock_fprog prog = {sizeof filter / sizeof filter[0], filter};
  prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
  prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
  syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog);
#endif
}

__attribute__((section(".preinit_array"), used)) static void (*const rlef_exec_guard_entry)(
    int, char**, char**) = rlef_exec_guard;
