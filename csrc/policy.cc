// The seccomp policy for untrusted solutions: one screen, built once per worker with libseccomp
// and exported to raw BPF so that loading it into each test's process costs one syscall.
//
// Unknown syscalls fail with EPERM (a harmless probe should not cost a verdict); the calls below
// marked KILL are what hostile code needs to escape or interfere, and end the process with SIGSYS,
// which the supervisor reports as SANDBOX_VIOLATION.
//
// A second, tiny filter (self_filter) is built per test with the test's own pid in it: the
// kernel runs both and the stricter answer wins, so signals and prlimit64 reach nothing but
// the test itself, whatever its uid (without root, the kernel sees the worker's own uid).
#include "sandbox.h"

#include <errno.h>
#include <linux/audit.h>
#include <linux/seccomp.h>
#include <sched.h>
#include <seccomp.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <termios.h>
#include <unistd.h>

#include <initializer_list>

namespace {

const char* const kAllow[] = {
    // I/O on descriptors the process already has or opens itself (the filesystem is read-only
    // outside the scratch directory, so opening for write elsewhere fails with EROFS). ioctl:
    // a few harmless requests only, see build(). No memfd_create: memory held in a memfd is
    // not counted by RLIMIT_AS (a test held gigabytes that way).
    "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev", "lseek",
    "close", "close_range", "dup", "dup2", "dup3", "fcntl", "pipe", "pipe2", "open",
    "openat", "stat", "fstat", "lstat", "newfstatat", "statx", "statfs", "fstatfs", "access",
    "faccessat", "faccessat2", "getdents", "getdents64", "readlink", "readlinkat", "getcwd",
    "chdir", "fchdir", "mkdir", "mkdirat", "unlink", "unlinkat", "rename", "renameat",
    "renameat2", "ftruncate", "truncate", "fsync", "fdatasync", "fadvise64", "umask", "sendfile",
    "splice", "tee", "copy_file_range", "poll", "ppoll", "select", "pselect6",
    "epoll_create", "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait", "eventfd2",
    // Memory.
    "brk", "mmap", "munmap", "mremap", "mprotect", "madvise", "mincore", "msync", "membarrier",
    // Threads, signals, time, identity.
    "futex", "set_robust_list", "set_tid_address", "rseq", "arch_prctl",
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "rt_sigsuspend", "rt_sigtimedwait",
    // kill, tgkill, prlimit64: only on the test itself, which self_filter checks.
    "sigaltstack", "kill", "tgkill", "alarm", "getitimer", "setitimer", "timer_create", "timer_settime",
    "timer_gettime", "timer_delete", "timerfd_create", "timerfd_settime", "timerfd_gettime",
    "clock_gettime", "clock_getres", "clock_nanosleep", "nanosleep", "gettimeofday", "time",
    "times", "getrusage", "getrlimit", "setrlimit", "prlimit64", "sched_yield",
    "sched_getaffinity", "sched_getparam", "sched_getscheduler", "sched_get_priority_max",
    "sched_get_priority_min", "getpid", "getppid", "gettid", "getuid", "geteuid", "getgid",
    "getegid", "getgroups", "getresuid", "getresgid", "getpgrp", "getpgid", "getsid", "uname",
    "sysinfo", "getrandom", "wait4", "waitid", "exit", "exit_group", "restart_syscall",
    // More filters can only take more away: the exec guard linked into C++ solutions adds one.
    "seccomp",
};

const char* const kKill[] = {
    "socket", "socketpair", "ptrace", "process_vm_readv", "process_vm_writev", "mount",
    "umount2", "unshare", "setns", "pivot_root", "chroot", "bpf", "perf_event_open",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot",
    "swapon", "swapoff", "keyctl", "add_key", "request_key", "userfaultfd", "io_uring_setup",
    "name_to_handle_at", "open_by_handle_at", "iopl", "ioperm", "acct", "settimeofday",
    "clock_settime", "adjtimex", "sethostname", "setdomainname", "quotactl", "fanotify_init",
    "kcmp", "pidfd_open", "pidfd_getfd", "pidfd_send_signal", "tkill", "execveat",
    "rt_sigqueueinfo", "rt_tgsigqueueinfo", "process_madvise", "memfd_secret",
    "move_pages", "migrate_pages", "mbind", "set_mempolicy",
};

const uint64_t kNamespaceFlags = CLONE_NEWNS | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET |
                                 CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWCGROUP;

int add(scmp_filter_ctx ctx, uint32_t action, const char* name, bool has_arg = false,
        scmp_arg_cmp arg = {}) {
  int nr = seccomp_syscall_resolve_name(name);
  if (nr == __NR_SCMP_ERROR) return 0;  // not on this architecture
  return has_arg ? seccomp_rule_add(ctx, action, nr, 1, arg) : seccomp_rule_add(ctx, action, nr, 0);
}

int build(scmp_filter_ctx ctx, const Policy& p) {
  int rc = 0;
  for (const char* name : kAllow) rc |= add(ctx, SCMP_ACT_ALLOW, name);
  for (const char* name : kKill) rc |= add(ctx, SCMP_ACT_KILL_PROCESS, name);
  // ioctl: what stdio libraries ask of a descriptor. "Is it a terminal?" gets "no" (there is
  // none); every other request (TIOCSTI, TIOCSCTTY, TIOCSPGRP, TCSETS, ...) fails with EPERM.
  // The request is compared in full, 64 bits: the kernel truncates it to 32, so only an
  // allow-list (never a deny-list) is proof against high bits.
  for (unsigned long cmd : {FIONREAD, FIONBIO, FIOCLEX, FIONCLEX})
    rc |= add(ctx, SCMP_ACT_ALLOW, "ioctl", true, SCMP_A1_64(SCMP_CMP_EQ, cmd));
  rc |= add(ctx, SCMP_ACT_ERRNO(ENOTTY), "ioctl", true, SCMP_A1_64(SCMP_CMP_EQ, TCGETS));
  // clone3 hides its flags behind a pointer; ENOSYS makes glibc fall back to clone, whose
  // flags the filter can read.
  rc |= add(ctx, SCMP_ACT_ERRNO(ENOSYS), "clone3");
  // Threads always; new processes only when the caller allows them; new namespaces never.
  const uint64_t mask = CLONE_THREAD | kNamespaceFlags;
  rc |= add(ctx, SCMP_ACT_ALLOW, "clone", true, SCMP_A0_64(SCMP_CMP_MASKED_EQ, mask, CLONE_THREAD));
  uint32_t fork_action = p.allow_subprocesses ? SCMP_ACT_ALLOW : SCMP_ACT_KILL_PROCESS;
  rc |= add(ctx, fork_action, "clone", true, SCMP_A0_64(SCMP_CMP_MASKED_EQ, mask, 0));
  rc |= add(ctx, fork_action, "fork");
  rc |= add(ctx, fork_action, "vfork");
  if (p.allow_subprocesses) {
    rc |= add(ctx, SCMP_ACT_ALLOW, "setsid");
    rc |= add(ctx, SCMP_ACT_ALLOW, "setpgid");
  }
  // exec: a Python test never execs; a native test execs exactly once, the binary whose path the
  // supervisor placed at exec_path (the filter compares the pointer, which the solution cannot
  // know). After that exec, the guard linked into every compiled solution forbids exec entirely.
  if (p.exec_path != nullptr) {
    uint64_t ptr = reinterpret_cast<uint64_t>(p.exec_path);
    rc |= add(ctx, SCMP_ACT_ALLOW, "execve", true, SCMP_A0_64(SCMP_CMP_EQ, ptr));
    rc |= add(ctx, SCMP_ACT_KILL_PROCESS, "execve", true, SCMP_A0_64(SCMP_CMP_NE, ptr));
  } else {
    rc |= add(ctx, SCMP_ACT_KILL_PROCESS, "execve");
  }
  return rc;
}

}  // namespace

int export_policy(const Policy& policy, sock_fprog* out) {
  scmp_filter_ctx ctx = seccomp_init(SCMP_ACT_ERRNO(EPERM));
  if (ctx == nullptr) return -ENOMEM;
  // The caller sets no_new_privs itself, once per test, right before loading the filter.
  seccomp_attr_set(ctx, SCMP_FLTATR_CTL_NNP, 0);
  // A binary tree of syscall numbers: the kernel evaluates the filter for every syscall when
  // it is loaded (to cache constant answers), so a short path makes loading it 4x cheaper.
  seccomp_attr_set(ctx, SCMP_FLTATR_CTL_OPTIMIZE, 2);
  int rc = build(ctx, policy);
  int fd = rc == 0 ? memfd_create("seccomp-bpf", MFD_CLOEXEC) : -1;
  if (rc == 0 && fd < 0) rc = -errno;
  if (rc == 0) rc = seccomp_export_bpf(ctx, fd);
  seccomp_release(ctx);
  if (rc != 0) {
    if (fd >= 0) close(fd);
    return rc < 0 ? rc : -EINVAL;
  }
  off_t size = lseek(fd, 0, SEEK_END);
  auto* filter = static_cast<sock_filter*>(malloc(size));
  if (filter == nullptr || pread(fd, filter, size, 0) != size) {
    free(filter);
    close(fd);
    return -EIO;
  }
  close(fd);
  out->len = static_cast<unsigned short>(size / sizeof(sock_filter));
  out->filter = filter;
  return 0;
}

#if defined(__x86_64__)
#define RLEF_AUDIT_ARCH AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define RLEF_AUDIT_ARCH AUDIT_ARCH_AARCH64
#else
#error "self_filter: unsupported architecture"
#endif

void self_filter(pid_t self, sock_filter* f, sock_fprog* out) {
  // pid_t arguments are 32-bit: the kernel reads the low word (little-endian: the first).
  const uint32_t pid = static_cast<uint32_t>(self);
  const uint32_t group = static_cast<uint32_t>(-self);  // kill(-pgid): its own group
  const uint32_t kAllow = SECCOMP_RET_ALLOW, kKill = SECCOMP_RET_KILL_PROCESS;
  const uint32_t kDeny = SECCOMP_RET_ERRNO | EPERM;
  const uint32_t arg0 = offsetof(seccomp_data, args[0]);
  int n = 0;
  auto stmt = [&](uint16_t code, uint32_t k) { f[n++] = BPF_STMT(code, k); };
  auto jeq = [&](uint32_t k, uint8_t jt, uint8_t jf) {
    f[n++] = BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, k, jt, jf);
  };
  // Jump offsets count from the next instruction; the comments give absolute targets.
  stmt(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, arch));  // 0
  jeq(RLEF_AUDIT_ARCH, 1, 0);                                     // 1: -> 3
  stmt(BPF_RET | BPF_K, kAllow);  // 2: another arch: the main policy answers (kills)
  stmt(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, nr));  // 3
  jeq(__NR_kill, 3, 0);                                        // 4: -> 8
  jeq(__NR_tgkill, 7, 0);                                      // 5: -> 13
  jeq(__NR_prlimit64, 9, 0);                                   // 6: -> 16
  stmt(BPF_RET | BPF_K, kAllow);                               // 7
  stmt(BPF_LD | BPF_W | BPF_ABS, arg0);                        // 8: kill(pid, sig)
  jeq(0, 9, 0);                                                // 9: its group -> 19
  jeq(pid, 8, 0);                                              // 10: itself -> 19
  jeq(group, 7, 0);                                            // 11: -its group -> 19
  stmt(BPF_RET | BPF_K, kKill);                                // 12
  stmt(BPF_LD | BPF_W | BPF_ABS, arg0);                        // 13: tgkill(tgid, tid, sig)
  jeq(pid, 4, 0);                                              // 14: -> 19
  stmt(BPF_RET | BPF_K, kKill);                                // 15
  stmt(BPF_LD | BPF_W | BPF_ABS, arg0);                        // 16: prlimit64(pid, ...)
  jeq(0, 1, 0);                                                // 17: -> 19
  jeq(pid, 0, 1);                                              // 18: -> 19 : 20
  stmt(BPF_RET | BPF_K, kAllow);                               // 19
  stmt(BPF_RET | BPF_K, kDeny);                                // 20
  out->len = static_cast<unsigned short>(n);
  out->filter = f;
}
