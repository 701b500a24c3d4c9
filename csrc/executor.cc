// rlef_hpc.sandbox._executor: the privileged core of a sandbox worker.
//
// A worker is a small, clean Python process (never the trainer) that calls isolate() once to
// become PID 1 of fresh PID/mount/network/IPC/UTS namespaces with a read-only view of the
// filesystem and a tmpfs scratch directory. Per test it calls spawn() (fork for Python, so the
// solution runs from a compiled code object in the already-warm interpreter; vfork+exec for
// native binaries) and supervise(), which enforces the wall clock and output cap from outside,
// kills everything the test started and returns what was observed.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <linux/landlock.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "sandbox.h"

namespace {

// --- per-worker state -------------------------------------------------------------------------

// Indexed by [native][allow_subprocesses].
sock_fprog g_policies[2][2];
bool g_policies_ready = false;
// The one path a native test may exec; its address is baked into the native policies.
char g_exec_path[PATH_MAX];
// Test input lives in a memfd so a solution that never reads stdin cannot block the supervisor.
int g_stdin_rw = -1;
int g_stdin_ro = -1;
bool g_pid_namespace = false;
// When the last test was spawned: its wall clock starts at the fork, not when the worker gets
// round to supervising it (on a busy machine the test may even be over by then).
double g_spawn_time = 0;

PyObject* os_error(const char* what) {
  return PyErr_Format(PyExc_OSError, "%s: %s", what, strerror(errno));
}

double now_s() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

bool write_file(const char* path, const char* text) {
  int fd = open(path, O_WRONLY | O_CLOEXEC);
  if (fd < 0) return false;
  ssize_t n = write(fd, text, strlen(text));
  close(fd);
  return n == static_cast<ssize_t>(strlen(text));
}

unsigned long locked_flags(const char* mountpoint) {
  // Remounting inside a user namespace must keep the flags the outer namespace locked.
  struct statvfs st;
  if (statvfs(mountpoint, &st) != 0) return 0;
  unsigned long flags = 0;
  if (st.f_flag & ST_NOSUID) flags |= MS_NOSUID;
  if (st.f_flag & ST_NODEV) flags |= MS_NODEV;
  if (st.f_flag & ST_NOEXEC) flags |= MS_NOEXEC;
  if (st.f_flag & ST_NOATIME) flags |= MS_NOATIME;
  if (st.f_flag & ST_NODIRATIME) flags |= MS_NODIRATIME;
  if (st.f_flag & ST_RELATIME) flags |= MS_RELATIME;
  return flags;
}

std::vector<std::string> mountpoints() {
  std::vector<std::string> out;
  FILE* f = fopen("/proc/self/mountinfo", "re");
  if (f == nullptr) return out;
  char line[4096];
  while (fgets(line, sizeof line, f) != nullptr) {
    // Fields: id parent major:minor root mountpoint ...; octal escapes only for odd names.
    char mp[4096];
    if (sscanf(line, "%*s %*s %*s %*s %4095s", mp) == 1 && strchr(mp, '\\') == nullptr)
      out.emplace_back(mp);
  }
  fclose(f);
  return out;
}

bool starts_with_dir(const std::string& path, const std::string& dir) {
  return path == dir || (path.size() > dir.size() && path.compare(0, dir.size(), dir) == 0 &&
                         path[dir.size()] == '/');
}

// --- isolate ----------------------------------------------------------------------------------

PyObject* isolate(PyObject*, PyObject* args) {
  const char* scratch;
  PyObject* writable_list;
  int scratch_mb;
  if (!PyArg_ParseTuple(args, "sO!i", &scratch, &PyList_Type, &writable_list, &scratch_mb))
    return nullptr;
  std::vector<std::string> writable;
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(writable_list); i++) {
    const char* p = PyUnicode_AsUTF8(PyList_GET_ITEM(writable_list, i));
    if (p == nullptr) return nullptr;
    writable.emplace_back(p);
  }
  // No PDEATHSIG here: it follows the executor's *thread*, not its process. A worker notices
  // its executor is gone by EOF on its request pipe.

  bool user_ns = false;
  uid_t uid = geteuid();
  gid_t gid = getegid();
  if (uid != 0) {
    // Unprivileged: a user namespace maps us to root inside, which the other namespaces need.
    if (unshare(CLONE_NEWUSER) != 0) return os_error("unshare(CLONE_NEWUSER)");
    char map[64];
    write_file("/proc/self/setgroups", "deny");
    snprintf(map, sizeof map, "0 %u 1\n", uid);
    if (!write_file("/proc/self/uid_map", map)) return os_error("write uid_map");
    snprintf(map, sizeof map, "0 %u 1\n", gid);
    if (!write_file("/proc/self/gid_map", map)) return os_error("write gid_map");
    user_ns = true;
  }
  if (unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS) != 0)
    return os_error("unshare(namespaces)");

  PyOS_BeforeFork();
  pid_t pid = fork();
  if (pid < 0) {
    PyOS_AfterFork_Parent();
    return os_error("fork");
  }
  if (pid > 0) {
    // The launcher: nothing to do but mirror the worker's fate. Stay out of Python entirely.
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    _exit(WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
  }
  PyOS_AfterFork_Child();
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  g_pid_namespace = true;

  bool proc_private = false, readonly_root = false, scratch_tmpfs = false;
  if (mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0)
    return os_error("make mounts private");
  // A proc of our own PID namespace: the harness's processes (and their environments) vanish.
  proc_private = mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, nullptr) == 0;
  for (const std::string& w : writable) {
    if (mount(w.c_str(), w.c_str(), nullptr, MS_BIND | MS_REC, nullptr) != 0)
      return os_error(("bind " + w).c_str());
  }
  char opts[64];
  snprintf(opts, sizeof opts, "size=%dm,mode=0755", scratch_mb);
  scratch_tmpfs = mount("tmpfs", scratch, "tmpfs", MS_NOSUID | MS_NODEV, opts) == 0;
  if (!scratch_tmpfs) return os_error("mount scratch tmpfs");

  // Everything else becomes read-only: a test can write only to its scratch directory.
  std::vector<std::string> keep(writable);
  keep.emplace_back(scratch);
  for (const std::string& mp : mountpoints()) {
    bool skip = false;
    for (const std::string& k : keep) skip |= starts_with_dir(mp, k);
    if (skip) continue;
    unsigned long flags = MS_REMOUNT | MS_BIND | MS_RDONLY | locked_flags(mp.c_str());
    bool ok = mount(nullptr, mp.c_str(), nullptr, flags, nullptr) == 0;
    if (mp == "/") readonly_root = ok;
  }
  sethostname("sandbox", 7);
  if (chdir(scratch) != 0) return os_error("chdir scratch");

  return Py_BuildValue("{s:O,s:O,s:O,s:O,s:O,s:O,s:O,s:O,s:O}", "user_ns", PyBool_FromLong(user_ns),
                       "pid_ns", Py_True, "net_ns", Py_True, "ipc_ns", Py_True, "mount_ns", Py_True,
                       "uts_ns", Py_True, "proc_private", PyBool_FromLong(proc_private),
                       "readonly_root", PyBool_FromLong(readonly_root), "scratch_tmpfs",
                       PyBool_FromLong(scratch_tmpfs));
}

PyObject* bind_readonly(PyObject*, PyObject* args) {
  const char *source, *target;
  if (!PyArg_ParseTuple(args, "ss", &source, &target)) return nullptr;
  if (mount(source, target, nullptr, MS_BIND, nullptr) != 0) return os_error("bind mount");
  unsigned long flags = MS_REMOUNT | MS_BIND | MS_RDONLY | locked_flags(target);
  if (mount(nullptr, target, nullptr, flags, nullptr) != 0) return os_error("remount read-only");
  Py_RETURN_NONE;
}

// --- landlock: writes only beneath the scratch directory ---------------------------------------
//
// The read-only remount already stops writes elsewhere, but a few directories stay writable for
// the worker (its scratch, the compile cache) and, without root, a test runs as the worker's own
// uid. Landlock confines the test's (and the compiler's) writes to one directory, whatever the
// uid; reading and executing are left alone.

uint64_t landlock_write_rights() {
  long abi = syscall(SYS_landlock_create_ruleset, nullptr, 0, LANDLOCK_CREATE_RULESET_VERSION);
  if (abi < 1) return 0;
  uint64_t rights = LANDLOCK_ACCESS_FS_WRITE_FILE | LANDLOCK_ACCESS_FS_REMOVE_DIR |
                    LANDLOCK_ACCESS_FS_REMOVE_FILE | LANDLOCK_ACCESS_FS_MAKE_CHAR |
                    LANDLOCK_ACCESS_FS_MAKE_DIR | LANDLOCK_ACCESS_FS_MAKE_REG |
                    LANDLOCK_ACCESS_FS_MAKE_SOCK | LANDLOCK_ACCESS_FS_MAKE_FIFO |
                    LANDLOCK_ACCESS_FS_MAKE_BLOCK | LANDLOCK_ACCESS_FS_MAKE_SYM;
  if (abi >= 2) rights |= 1ULL << 13;  // LANDLOCK_ACCESS_FS_REFER
  if (abi >= 3) rights |= 1ULL << 14;  // LANDLOCK_ACCESS_FS_TRUNCATE
  return rights;
}

// The ruleset every test's process applies: writes beneath the test's working directory only.
int g_test_landlock = -1;

PyObject* landlock_ruleset(PyObject*, PyObject* args) {
  const char* writable;
  if (!PyArg_ParseTuple(args, "s", &writable)) return nullptr;
  uint64_t rights = landlock_write_rights();
  if (rights == 0) return PyLong_FromLong(-1);  // kernel without Landlock
  landlock_ruleset_attr attr{};
  attr.handled_access_fs = rights;
  int ruleset = static_cast<int>(syscall(SYS_landlock_create_ruleset, &attr, sizeof attr, 0));
  if (ruleset < 0) return os_error("landlock_create_ruleset");
  int dir = open(writable, O_PATH | O_CLOEXEC);
  landlock_path_beneath_attr rule{rights, dir};
  if (dir < 0 || syscall(SYS_landlock_add_rule, ruleset, LANDLOCK_RULE_PATH_BENEATH, &rule, 0)) {
    int saved = errno;
    if (dir >= 0) close(dir);
    close(ruleset);
    errno = saved;
    return os_error("landlock_add_rule");
  }
  close(dir);
  return PyLong_FromLong(ruleset);
}

PyObject* set_test_landlock(PyObject*, PyObject* args) {
  if (!PyArg_ParseTuple(args, "i", &g_test_landlock)) return nullptr;
  Py_RETURN_NONE;
}

int apply_landlock(int ruleset) {
  if (ruleset < 0) return 0;
  if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) return errno;
  return syscall(SYS_landlock_restrict_self, ruleset, 0) == 0 ? 0 : errno;
}

PyObject* landlock_apply(PyObject*, PyObject* args) {
  int ruleset;
  if (!PyArg_ParseTuple(args, "i", &ruleset)) return nullptr;
  if ((errno = apply_landlock(ruleset)) != 0) return os_error("landlock_restrict_self");
  Py_RETURN_NONE;
}

// --- policies ---------------------------------------------------------------------------------

PyObject* build_policies(PyObject*, PyObject*) {
  if (g_policies_ready) Py_RETURN_NONE;
  for (int native = 0; native < 2; native++) {
    for (int sub = 0; sub < 2; sub++) {
      Policy p{sub == 1, native ? g_exec_path : nullptr};
      int rc = export_policy(p, &g_policies[native][sub]);
      if (rc != 0) {
        errno = -rc;
        return os_error("build seccomp policy");
      }
    }
  }
  g_policies_ready = true;
  Py_RETURN_NONE;
}

PyObject* seccomp_available(PyObject*, PyObject*) {
  // SECCOMP_GET_ACTION_AVAIL answers without changing anything about the caller.
  uint32_t action = SECCOMP_RET_KILL_PROCESS;
  long rc = syscall(SYS_seccomp, SECCOMP_GET_ACTION_AVAIL, 0, &action);
  return PyBool_FromLong(rc == 0);
}

// --- spawn ------------------------------------------------------------------------------------

// A test's rlimits, in the field order of rlef_hpc.sandbox.rlimits.Rlimits (a NamedTuple):
// Python passes that tuple and parse_rlimits reads it here, the one place that does.
struct Rlimits {
  unsigned long long address_space, cpu_s, file_size, open_files, processes, stack;
};
// The names of Rlimits' fields in order, exported as _executor.RLIMIT_FIELDS so that a test can
// hold the Python NamedTuple to the order read here.
const char* const kRlimitFields[] = {"address_space", "cpu_s",     "file_size",
                                     "open_files",    "processes", "stack"};

// A PyArg "O&" converter: a 6-tuple (an Rlimits) into the struct, in field order.
int parse_rlimits(PyObject* obj, void* out) {
  Rlimits& l = *static_cast<Rlimits*>(out);
  if (!PyTuple_Check(obj) || PyTuple_GET_SIZE(obj) != 6) {
    PyErr_Format(PyExc_TypeError, "rlimits must be an Rlimits (6 fields), got %R", obj);
    return 0;
  }
  return PyArg_ParseTuple(obj, "KKKKKK:rlimits", &l.address_space, &l.cpu_s, &l.file_size,
                          &l.open_files, &l.processes, &l.stack);
}

struct ChildSpec {
  Rlimits limits;
  int stdout_w, stderr_w;
  uid_t uid;
  gid_t gid;
  bool drop_uid;
  const sock_fprog* policy;  // nullptr: unsafe mode, rlimits only
};

void set_limit(int resource, unsigned long long soft, unsigned long long hard) {
  rlimit rl{static_cast<rlim_t>(soft), static_cast<rlim_t>(hard)};
  setrlimit(resource, &rl);
}

// Runs in the test's process (a fork or a vfork child): only async-signal-safe calls here.
// Returns 0, or the errno of the step that failed (the caller must then exit, not run the test).
int enter_sandbox(const ChildSpec& s) {
  setpgid(0, 0);
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (dup2(g_stdin_ro, 0) < 0 || dup2(s.stdout_w, 1) < 0 || dup2(s.stderr_w, 2) < 0) return errno;
  if (int e = apply_landlock(g_test_landlock); e != 0) return e;
  // Nothing but stdio survives: in particular not the worker's channel to the executor.
  if (syscall(SYS_close_range, 3, ~0U, 0) != 0) {
    for (int fd = 3; fd < 65536; fd++) close(fd);
  }
  const Rlimits& l = s.limits;
  set_limit(RLIMIT_AS, l.address_space, l.address_space);
  set_limit(RLIMIT_CPU, l.cpu_s, l.cpu_s + 1);  // SIGXCPU, then SIGKILL a second later
  set_limit(RLIMIT_FSIZE, l.file_size, l.file_size);
  set_limit(RLIMIT_NOFILE, l.open_files, l.open_files);
  set_limit(RLIMIT_NPROC, l.processes, l.processes);
  set_limit(RLIMIT_STACK, l.stack, l.stack);
  set_limit(RLIMIT_CORE, 0, 0);
  set_limit(RLIMIT_MEMLOCK, 0, 0);
  if (s.drop_uid) {
    // Raw syscalls: glibc's wrappers broadcast to threads, which a vfork child must not do.
    if (syscall(SYS_setgroups, 0, nullptr) != 0) return errno;
    if (syscall(SYS_setresgid, s.gid, s.gid, s.gid) != 0) return errno;
    if (syscall(SYS_setresuid, s.uid, s.uid, s.uid) != 0) return errno;
  }
  if (s.policy != nullptr) {
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) return errno;
    if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, s.policy) != 0) return errno;
  }
  return 0;
}

// Exit status 120 plus this marker on stderr tell the worker that the sandbox, not the solution,
// failed; the test is then never run.
[[noreturn]] void setup_failed(int err) {
  char msg[] = "rlef-sandbox-setup-failed errno=000\n";
  char* digits = msg + sizeof msg - 5;
  for (int i = 2; i >= 0; i--, err /= 10) digits[i] = static_cast<char>('0' + err % 10);
  (void)!write(2, msg, sizeof msg - 1);
  _exit(120);
}

// --- a Python test out of memory --------------------------------------------------------------
//
// Under RLIMIT_AS, CPython does not die when memory runs out: it carries on at the limit. A
// recursion without bound (its frames live on the heap since 3.11) fails to push a frame, which
// 3.11 reports as a SystemError, and then unwinds a million frames, each of which needs memory
// for its traceback that it cannot get: seconds of CPU at the limit until the clock kills it,
// judged TIME_LIMIT. So a Python test's allocators are wrapped: when a small request fails the
// process is within that much of its limit and cannot make progress (not even to report it), and
// it ends there, at once, as an uncaught MemoryError would end it. A large request that fails
// still raises MemoryError as usual (a solution may catch that one and carry on).

// Requests up to this size count as small: pymalloc arenas (256 KiB; 1 MiB from 3.12) and the
// frame stack's chunks (16 KiB and up) go through the arena allocator.
constexpr size_t kSmallRequest = size_t{1} << 20;
// What run_solution (child.py) prints for a MemoryError: one verdict whichever way it ends.
const char kOutOfMemory[] =
    "Traceback (most recent call last):\n  (omitted: out of memory)\nMemoryError\n";

PyMemAllocatorEx g_base_alloc[3];  // PYMEM_DOMAIN_RAW, _MEM, _OBJ as they were before the wrap
PyObjectArenaAllocator g_base_arena;

[[noreturn]] void out_of_memory() {
  (void)!write(2, kOutOfMemory, sizeof kOutOfMemory - 1);
  _exit(1);
}

void* unless_exhausted(void* p, size_t size) {
  if (p == nullptr && size <= kSmallRequest) out_of_memory();
  return p;
}

void* oom_malloc(void* ctx, size_t size) {
  auto* base = static_cast<PyMemAllocatorEx*>(ctx);
  return unless_exhausted(base->malloc(base->ctx, size), size);
}

void* oom_calloc(void* ctx, size_t n, size_t elsize) {
  auto* base = static_cast<PyMemAllocatorEx*>(ctx);
  size_t size;
  if (__builtin_mul_overflow(n, elsize, &size)) size = SIZE_MAX;  // fails as a large request
  return unless_exhausted(base->calloc(base->ctx, n, elsize), size);
}

void* oom_realloc(void* ctx, void* ptr, size_t size) {
  auto* base = static_cast<PyMemAllocatorEx*>(ctx);
  return unless_exhausted(base->realloc(base->ctx, ptr, size), size);
}

void oom_free(void* ctx, void* ptr) {
  auto* base = static_cast<PyMemAllocatorEx*>(ctx);
  base->free(base->ctx, ptr);
}

void* oom_arena_alloc(void* ctx, size_t size) {
  auto* base = static_cast<PyObjectArenaAllocator*>(ctx);
  return unless_exhausted(base->alloc(base->ctx, size), size);
}

void oom_arena_free(void* ctx, void* ptr, size_t size) {
  auto* base = static_cast<PyObjectArenaAllocator*>(ctx);
  base->free(base->ctx, ptr, size);
}

// In a Python test's process, once it is in the sandbox (one thread): wraps, never replaces,
// the interpreter's allocators, as the C API allows after initialisation.
void end_when_out_of_memory() {
  const PyMemAllocatorDomain domains[] = {PYMEM_DOMAIN_RAW, PYMEM_DOMAIN_MEM, PYMEM_DOMAIN_OBJ};
  for (int i = 0; i < 3; i++) {
    PyMem_GetAllocator(domains[i], &g_base_alloc[i]);
    PyMemAllocatorEx wrap{&g_base_alloc[i], oom_malloc, oom_calloc, oom_realloc, oom_free};
    PyMem_SetAllocator(domains[i], &wrap);
  }
  PyObject_GetArenaAllocator(&g_base_arena);
  PyObjectArenaAllocator arena{&g_base_arena, oom_arena_alloc, oom_arena_free};
  PyObject_SetArenaAllocator(&arena);
}

char* const kNativeArgv[] = {const_cast<char*>("solution"), nullptr};
char* const kNativeEnv[] = {const_cast<char*>("PATH=/usr/bin:/bin"),
                            const_cast<char*>("LANG=C.UTF-8"), nullptr};

int native_child(void* arg) {
  const ChildSpec& s = *static_cast<const ChildSpec*>(arg);
  int err = enter_sandbox(s);
  if (err != 0) setup_failed(err);
  execve(g_exec_path, kNativeArgv, kNativeEnv);
  setup_failed(errno);
}

bool fill_stdin(const char* data, Py_ssize_t len) {
  if (g_stdin_rw < 0) {
    g_stdin_rw = memfd_create("stdin", MFD_CLOEXEC);
    if (g_stdin_rw < 0) return false;
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", g_stdin_rw);
    // A read-only description for the child; without /proc it shares the writable one.
    g_stdin_ro = open(path, O_RDONLY | O_CLOEXEC);
    if (g_stdin_ro < 0) g_stdin_ro = g_stdin_rw;
  }
  if (ftruncate(g_stdin_rw, 0) != 0) return false;
  Py_ssize_t done = 0;
  while (done < len) {
    ssize_t n = pwrite(g_stdin_rw, data + done, len - done, done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    done += n;
  }
  return lseek(g_stdin_ro, 0, SEEK_SET) == 0;
}

PyObject* spawn(PyObject*, PyObject* args, PyObject* kwargs) {
  int native, allow_sub, safe, drop_uid;
  unsigned int uid, gid;
  const char* stdin_data;
  Py_ssize_t stdin_len;
  const char* exec_path = nullptr;
  Rlimits l;
  static const char* kwlist[] = {"native", "allow_subprocesses", "safe", "drop_uid", "uid",
                                 "gid", "stdin", "exec_path", "rlimits", nullptr};
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "ppppIIy#zO&", const_cast<char**>(kwlist),
                                   &native, &allow_sub, &safe, &drop_uid, &uid, &gid, &stdin_data,
                                   &stdin_len, &exec_path, parse_rlimits, &l))
    return nullptr;
  if (safe && !g_policies_ready) return PyErr_Format(PyExc_RuntimeError, "policies not built");
  if (native) {
    if (exec_path == nullptr || strlen(exec_path) >= sizeof g_exec_path)
      return PyErr_Format(PyExc_ValueError, "native test needs an executable path");
    strcpy(g_exec_path, exec_path);
  }
  if (!fill_stdin(stdin_data, stdin_len)) return os_error("stdin memfd");
  int out[2], err[2];
  if (pipe2(out, O_CLOEXEC) != 0) return os_error("pipe");
  if (pipe2(err, O_CLOEXEC) != 0) {
    close(out[0]);
    close(out[1]);
    return os_error("pipe");
  }
  fcntl(out[0], F_SETPIPE_SZ, 1 << 20);  // fewer wake-ups for large outputs; best effort
  ChildSpec spec{l, out[1], err[1], uid, gid, drop_uid != 0,
                 safe ? &g_policies[native][allow_sub] : nullptr};

  pid_t pid;
  g_spawn_time = now_s();
  if (native) {
    // CLONE_VM|CLONE_VFORK: no page tables are copied, whatever the worker's size.
    static char stack[64 * 1024] __attribute__((aligned(16)));
    pid = clone(native_child, stack + sizeof stack, CLONE_VM | CLONE_VFORK | SIGCHLD, &spec);
  } else {
    PyOS_BeforeFork();
    pid = fork();
    if (pid == 0) {
      PyOS_AfterFork_Child();
      int e = enter_sandbox(spec);
      if (e != 0) setup_failed(e);
      end_when_out_of_memory();
      return Py_BuildValue("(iii)", 0, -1, -1);  // the solution runs in Python from here
    }
    PyOS_AfterFork_Parent();
  }
  int saved = errno;
  close(out[1]);
  close(err[1]);
  if (pid < 0) {
    close(out[0]);
    close(err[0]);
    errno = saved;
    return os_error("fork");
  }
  return Py_BuildValue("(iii)", pid, out[0], err[0]);
}

// --- prefork: a Python test's process, forked before its test arrives ------------------------
//
// Forking the worker and warming the child's copy of it (copy-on-write faults, fork handlers)
// is most of a Python test's cost. The worker forks the next test's process while it waits for
// work; dispatch() hands it the test, and it enters the sandbox only then, with that test's
// limits and policy. The spare is the only child the worker has between tests.

struct GoHeader {
  uint32_t payload_len;
  uint8_t allow_sub, safe, drop_uid, pad;
  uint32_t uid, gid;
  Rlimits limits;
};

struct Spare {
  pid_t pid = 0;
  int go = -1, out = -1, err = -1;  // in the worker: write end of go, read ends of out/err
};
Spare g_spare;

bool read_all(int fd, void* buf, size_t len) {
  char* p = static_cast<char*>(buf);
  while (len > 0) {
    ssize_t n = read(fd, p, len);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    p += n;
    len -= n;
  }
  return true;
}

bool write_all(int fd, const void* buf, size_t len) {
  const char* p = static_cast<const char*>(buf);
  while (len > 0) {
    ssize_t n = write(fd, p, len);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    p += n;
    len -= n;
  }
  return true;
}

void close_spare() {
  for (int* fd : {&g_spare.go, &g_spare.out, &g_spare.err}) {
    if (*fd >= 0) close(*fd);
    *fd = -1;
  }
  g_spare.pid = 0;
}

PyObject* drop_spare(PyObject*, PyObject*) {
  if (g_spare.pid > 0) {
    kill(g_spare.pid, SIGKILL);
    while (waitpid(g_spare.pid, nullptr, 0) < 0 && errno == EINTR) {
    }
  }
  close_spare();
  Py_RETURN_NONE;
}

// In the spare: the worker's ends of its pipes, closed there, and ours.
int g_go_r = -1, g_out_w = -1, g_err_w = -1;

PyObject* prefork(PyObject*, PyObject*) {
  if (g_spare.pid > 0) return PyLong_FromLong(g_spare.pid);
  if (g_stdin_rw < 0 && !fill_stdin("", 0)) return os_error("stdin memfd");
  int go[2], out[2], err[2];
  if (pipe2(go, O_CLOEXEC) != 0) return os_error("pipe");
  if (pipe2(out, O_CLOEXEC) != 0 || pipe2(err, O_CLOEXEC) != 0) {
    int saved = errno;
    for (int fd : {go[0], go[1], out[0], out[1]}) close(fd);
    errno = saved;
    return os_error("pipe");
  }
  fcntl(out[0], F_SETPIPE_SZ, 1 << 20);
  // Names tell a waiting spare from a test's processes (Executor.leftover_processes). The spare
  // is born with its name; a test cannot take it back (no prctl in its policy, /proc is ro).
  prctl(PR_SET_NAME, "rlef-spare");
  PyOS_BeforeFork();
  pid_t pid = fork();
  if (pid != 0) prctl(PR_SET_NAME, "rlef-worker");
  if (pid == 0) {
    PyOS_AfterFork_Child();
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    close(go[1]);
    close(out[0]);
    close(err[0]);
    g_go_r = go[0];
    g_out_w = out[1];
    g_err_w = err[1];
    return PyLong_FromLong(0);
  }
  PyOS_AfterFork_Parent();
  int saved = errno;
  close(go[0]);
  close(out[1]);
  close(err[1]);
  if (pid < 0) {
    for (int fd : {go[1], out[0], err[0]}) close(fd);
    errno = saved;
    return os_error("fork");
  }
  g_spare = {pid, go[1], out[0], err[0]};
  return PyLong_FromLong(pid);
}

PyObject* await_go(PyObject*, PyObject*) {
  GoHeader h;
  // EOF: the worker is done with us (it exited, or dropped the spare).
  if (!read_all(g_go_r, &h, sizeof h)) _exit(0);
  PyObject* payload = PyBytes_FromStringAndSize(nullptr, h.payload_len);
  if (payload == nullptr || !read_all(g_go_r, PyBytes_AS_STRING(payload), h.payload_len)) _exit(0);
  prctl(PR_SET_NAME, "rlef-test");
  ChildSpec spec{h.limits, g_out_w, g_err_w, h.uid, h.gid, h.drop_uid != 0,
                 h.safe ? &g_policies[0][h.allow_sub ? 1 : 0] : nullptr};
  int e = enter_sandbox(spec);
  if (e != 0) setup_failed(e);
  end_when_out_of_memory();
  return payload;
}

PyObject* dispatch(PyObject*, PyObject* args, PyObject* kwargs) {
  GoHeader h{};
  int allow_sub, safe, drop_uid;
  const char *stdin_data, *payload;
  Py_ssize_t stdin_len, payload_len;
  static const char* kwlist[] = {"allow_subprocesses", "safe", "drop_uid", "uid", "gid",
                                 "stdin", "payload", "rlimits", nullptr};
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "pppIIy#y#O&", const_cast<char**>(kwlist),
                                   &allow_sub, &safe, &drop_uid, &h.uid, &h.gid, &stdin_data,
                                   &stdin_len, &payload, &payload_len, parse_rlimits, &h.limits))
    return nullptr;
  if (g_spare.pid <= 0) return PyErr_Format(PyExc_RuntimeError, "no spare process");
  if (safe && !g_policies_ready) return PyErr_Format(PyExc_RuntimeError, "policies not built");
  h.payload_len = static_cast<uint32_t>(payload_len);
  h.allow_sub = allow_sub;
  h.safe = safe;
  h.drop_uid = drop_uid;
  if (!fill_stdin(stdin_data, stdin_len)) return os_error("stdin memfd");
  g_spawn_time = now_s();
  bool sent = write_all(g_spare.go, &h, sizeof h) && write_all(g_spare.go, payload, payload_len);
  Spare spare = g_spare;
  close(spare.go);
  g_spare = Spare{};
  if (!sent) {  // the spare died waiting (killed from outside): the caller spawns afresh
    kill(spare.pid, SIGKILL);
    waitpid(spare.pid, nullptr, 0);
    close(spare.out);
    close(spare.err);
    Py_RETURN_NONE;
  }
  return Py_BuildValue("(iii)", spare.pid, spare.out, spare.err);
}

// --- supervise --------------------------------------------------------------------------------

enum Reason { kExited = 0, kWallClock = 1, kOutputCap = 2 };

struct Capture {
  int fd;
  std::string data;
  size_t cap;
  bool keep_tail;  // stderr: the end (the traceback) matters, not the start
  bool over = false;
  bool open = true;
};

// Reads what is available; returns false at EOF or error.
bool pump(Capture& c) {
  char buf[65536];
  for (;;) {
    ssize_t n = read(c.fd, buf, sizeof buf);
    if (n > 0) {
      if (c.keep_tail) {
        c.data.append(buf, n);
        if (c.data.size() > 2 * c.cap) {
          c.data.erase(0, c.data.size() - c.cap);
          c.over = true;
        }
      } else {
        size_t room = c.data.size() < c.cap ? c.cap - c.data.size() : 0;
        c.data.append(buf, static_cast<size_t>(n) < room ? n : room);
        if (static_cast<size_t>(n) > room) c.over = true;
      }
      if (static_cast<size_t>(n) < sizeof buf) return true;
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EAGAIN) return true;
    return false;
  }
}

void kill_tree(pid_t pid) {
  // As PID 1 of the namespace, kill(-1) reaches every process a test could have left behind,
  // setsid'd grandchildren included; without the namespace, the test's process group.
  if (g_pid_namespace)
    kill(-1, SIGKILL);
  else
    kill(-pid, SIGKILL);
}

PyObject* supervise(PyObject*, PyObject* args, PyObject* kwargs) {
  int pid, out_fd, err_fd;
  double wall_limit;
  Py_ssize_t out_cap, err_cap;
  static const char* kwlist[] = {"pid",         "stdout_fd",  "stderr_fd",
                                 "wall_limit_s", "stdout_cap", "stderr_cap", nullptr};
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "iiidnn", const_cast<char**>(kwlist), &pid,
                                   &out_fd, &err_fd, &wall_limit, &out_cap, &err_cap))
    return nullptr;
  Capture out{out_fd, {}, static_cast<size_t>(out_cap), false};
  Capture err{err_fd, {}, static_cast<size_t>(err_cap), true};
  fcntl(out_fd, F_SETFL, O_NONBLOCK);
  fcntl(err_fd, F_SETFL, O_NONBLOCK);
  int pidfd = static_cast<int>(syscall(SYS_pidfd_open, pid, 0));
  double start = g_spawn_time > 0 ? g_spawn_time : now_s(), deadline = start + wall_limit;
  g_spawn_time = 0;
  Reason reason = kExited;
  int status = 0;
  rusage ru{};
  bool reaped = false;
  double wall = 0;

  Py_BEGIN_ALLOW_THREADS;
  for (;;) {
    pollfd fds[3];
    int n = 0;
    if (out.open) fds[n++] = {out.fd, POLLIN, 0};
    if (err.open) fds[n++] = {err.fd, POLLIN, 0};
    int pid_slot = -1;
    if (pidfd >= 0) {
      pid_slot = n;
      fds[n++] = {pidfd, POLLIN, 0};
    }
    double left = deadline - now_s();
    if (left <= 0) {
      reason = kWallClock;
      break;
    }
    // Without a pidfd, poll in short steps and ask waitpid whether the test is done.
    int timeout_ms = pidfd >= 0 ? static_cast<int>(left * 1000) + 1 : 2;
    int rc = poll(fds, n, timeout_ms);
    if (rc < 0 && errno != EINTR) break;
    for (int i = 0; i < n && rc > 0; i++) {
      if (fds[i].revents == 0 || i == pid_slot) continue;
      Capture& c = fds[i].fd == out.fd ? out : err;
      if (!pump(c)) c.open = false;
    }
    if (out.over) {
      reason = kOutputCap;
      break;
    }
    bool exited;
    if (pid_slot >= 0) {
      exited = rc > 0 && fds[pid_slot].revents != 0;
    } else {
      exited = reaped = wait4(pid, &status, WNOHANG, &ru) == pid;
    }
    if (exited) break;
  }
  wall = now_s() - start;
  kill_tree(pid);
  if (!reaped) {
    while (wait4(pid, &status, 0, &ru) < 0 && errno == EINTR) {
    }
  }
  // Reap whatever else the test left; all of it was killed above, so this cannot block long.
  if (g_pid_namespace) {
    while (waitpid(-1, nullptr, 0) > 0 || errno == EINTR) {
    }
  }
  // Output written just before exit is still in the pipes.
  if (out.open) pump(out);
  if (err.open) pump(err);
  if (out.over && reason == kExited) reason = kOutputCap;
  if (err.data.size() > err.cap) err.data.erase(0, err.data.size() - err.cap);
  Py_END_ALLOW_THREADS;

  if (pidfd >= 0) close(pidfd);
  close(out_fd);
  close(err_fd);
  int code = WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
  double cpu = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec * 1e-6 + ru.ru_stime.tv_sec +
               ru.ru_stime.tv_usec * 1e-6;
  return Py_BuildValue("{s:i,s:i,s:d,s:d,s:l,s:y#,s:y#,s:O}", "reason", reason, "code", code,
                       "wall_s", wall, "cpu_s", cpu, "max_rss_kb", ru.ru_maxrss, "stdout",
                       out.data.data(), static_cast<Py_ssize_t>(out.data.size()), "stderr",
                       err.data.data(), static_cast<Py_ssize_t>(err.data.size()), "stderr_over",
                       PyBool_FromLong(err.over));
}

PyMethodDef kMethods[] = {
    {"isolate", isolate, METH_VARARGS,
     "isolate(scratch, writable, scratch_mb) -> dict: become PID 1 of new namespaces."},
    {"bind_readonly", bind_readonly, METH_VARARGS,
     "bind_readonly(source, target): make source visible, read-only, at target."},
    {"landlock_ruleset", landlock_ruleset, METH_VARARGS,
     "landlock_ruleset(dir) -> fd: a ruleset allowing writes beneath dir only (-1: none)."},
    {"landlock_apply", landlock_apply, METH_VARARGS, "landlock_apply(fd): restrict the caller."},
    {"set_test_landlock", set_test_landlock, METH_VARARGS,
     "set_test_landlock(fd): the ruleset every test's process applies."},
    {"build_policies", build_policies, METH_NOARGS, "Build the seccomp filters (once)."},
    {"seccomp_available", seccomp_available, METH_NOARGS, "Whether seccomp filters can be used."},
    {"spawn", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(spawn)),
     METH_VARARGS | METH_KEYWORDS,
     "spawn(native, allow_subprocesses, safe, drop_uid, uid, gid, stdin, exec_path, rlimits)"
     " -> (pid, stdout_fd, stderr_fd); pid 0 in the (sandboxed) Python child."},
    {"prefork", prefork, METH_NOARGS,
     "prefork() -> pid: fork the next Python test's process now; 0 in that process."},
    {"await_go", await_go, METH_NOARGS,
     "In the spare: wait for the test, enter the sandbox, return the worker's payload."},
    {"dispatch", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(dispatch)),
     METH_VARARGS | METH_KEYWORDS,
     "dispatch(allow_subprocesses, safe, drop_uid, uid, gid, stdin, payload, rlimits)"
     " -> (pid, stdout_fd, stderr_fd), or None if the spare is gone."},
    {"drop_spare", drop_spare, METH_NOARGS, "Kill and reap the spare, if any."},
    {"supervise", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(supervise)),
     METH_VARARGS | METH_KEYWORDS,
     "supervise(pid, stdout_fd, stderr_fd, wall_limit_s, stdout_cap, stderr_cap) -> dict"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_executor", nullptr, -1, kMethods};

}  // namespace

PyMODINIT_FUNC PyInit__executor() {
  PyObject* module = PyModule_Create(&kModule);
  if (module == nullptr) return nullptr;
  PyObject* fields = Py_BuildValue("(ssssss)", kRlimitFields[0], kRlimitFields[1],
                                   kRlimitFields[2], kRlimitFields[3], kRlimitFields[4],
                                   kRlimitFields[5]);
  if (fields == nullptr || PyModule_AddObject(module, "RLIMIT_FIELDS", fields) != 0) {
    Py_XDECREF(fields);
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
