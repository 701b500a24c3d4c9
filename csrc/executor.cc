// rlef_hpc.sandbox._executor: the privileged core of a sandbox worker.
//
// A worker is a small, clean Python process (never the trainer). Once, it calls isolate() to
// become PID 1 of fresh PID/mount/network/IPC/UTS/cgroup namespaces (plus a user namespace when
// not root), builds its file trees with the mount primitives below (isolation.py says what goes
// in them) and pivot_root()s onto the worker's own tree. configure() then fixes how every test's
// process is confined, and start_template() forks the template: a copy of the warm interpreter
// made before any job, from which every Python test's process is forked, so that no test ever
// starts from memory that held another test's data.
//
// Per test, a process enters the sandbox (enter_sandbox): a session of its own (no controlling
// terminal), chroot into the test tree (interpreter, standard library, the test's binary, its
// /tmp), Landlock, no descriptor but stdio, rlimits, no capabilities as an unprivileged uid
// (real root: the worker's own uid; otherwise an unmapped uid in a user namespace of its own),
// and two seccomp filters. supervise() enforces the wall clock and output cap from outside and
// kills everything the test started.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <linux/capability.h>
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
#include <sys/socket.h>
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

// How tests (and the compiler) are confined: set once by configure(), before the template is
// forked, so that the template and every spare hold the same.
struct Confinement {
  char root[PATH_MAX];  // chroot (empty: none)
  char cwd[PATH_MAX];   // inside it
  int landlock = -1;    // ruleset fd (-1: none)
  bool seccomp = false;
};
Confinement g_test, g_compile;
bool g_drop_uid = false;  // real root: tests run as g_uid/g_gid
bool g_unmapped = false;  // user namespace: tests run as an unmapped uid in one of their own
uid_t g_uid = 0;
gid_t g_gid = 0;

// The template (see start_template) and its channel; in the template, the worker's end.
pid_t g_template_pid = 0;
int g_template_sock = -1;
bool g_template_dead = false;

PyObject* os_error(const char* what) {
  return PyErr_Format(PyExc_OSError, "%s: %s", what, strerror(errno));
}

PyObject* os_error_path(const char* what, const char* path) {
  return PyErr_Format(PyExc_OSError, "%s %s: %s", what, path, strerror(errno));
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

// --- isolate ----------------------------------------------------------------------------------

PyObject* isolate(PyObject*, PyObject* args) {
  int cpu;
  if (!PyArg_ParseTuple(args, "i", &cpu)) return nullptr;
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
  int flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS;
  if (unshare(flags) != 0) return os_error("unshare(namespaces)");
  // The cgroup namespace only hides the host's cgroup paths: welcome, not required.
  bool cgroup_ns = unshare(CLONE_NEWCGROUP) == 0;

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
  if (mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0)
    return os_error("make mounts private");
  sethostname("sandbox", 7);
  // One CPU per worker: a test's threads compete with its own worker's, never another's.
  bool pinned = false;
  if (cpu >= 0) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    pinned = sched_setaffinity(0, sizeof set, &set) == 0;
  }
  return Py_BuildValue("{s:O,s:O,s:O,s:O,s:O,s:O,s:O,s:i}", "user_ns", PyBool_FromLong(user_ns),
                       "pid_ns", Py_True, "net_ns", Py_True, "ipc_ns", Py_True, "mount_ns",
                       Py_True, "uts_ns", Py_True, "cgroup_ns", PyBool_FromLong(cgroup_ns),
                       "cpu", pinned ? cpu : -1);
}

// --- mounts: the primitives isolation.py builds the trees with --------------------------------

PyObject* mount_tmpfs(PyObject*, PyObject* args) {
  const char *target, *options;
  int readonly = 0;
  if (!PyArg_ParseTuple(args, "ss|p", &target, &options, &readonly)) return nullptr;
  unsigned long flags = MS_NOSUID | MS_NODEV | (readonly ? MS_RDONLY : 0);
  if (mount("tmpfs", target, "tmpfs", flags, options) != 0)
    return os_error_path("mount tmpfs on", target);
  Py_RETURN_NONE;
}

PyObject* mount_proc(PyObject*, PyObject* args) {
  const char* target;
  if (!PyArg_ParseTuple(args, "s", &target)) return nullptr;
  if (mount("proc", target, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, nullptr) != 0)
    return os_error_path("mount proc on", target);
  Py_RETURN_NONE;
}

// source (a file or directory) visible at target (which must exist); read-only unless asked.
// Never recursive: what is mounted beneath source on the host stays out of the tree.
PyObject* bind(PyObject*, PyObject* args) {
  const char *source, *target;
  int readonly = 1;
  if (!PyArg_ParseTuple(args, "ss|p", &source, &target, &readonly)) return nullptr;
  if (mount(source, target, nullptr, MS_BIND, nullptr) != 0)
    return os_error_path("bind mount", source);
  if (readonly) {
    unsigned long flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | locked_flags(target);
    if (mount(nullptr, target, nullptr, flags, nullptr) != 0)
      return os_error_path("remount read-only", target);
  }
  Py_RETURN_NONE;
}

PyObject* remount_readonly(PyObject*, PyObject* args) {
  const char* target;
  if (!PyArg_ParseTuple(args, "s", &target)) return nullptr;
  unsigned long flags = MS_REMOUNT | MS_BIND | MS_RDONLY | locked_flags(target);
  if (mount(nullptr, target, nullptr, flags, nullptr) != 0)
    return os_error_path("remount read-only", target);
  Py_RETURN_NONE;
}

PyObject* unmount(PyObject*, PyObject* args) {
  const char* target;
  if (!PyArg_ParseTuple(args, "s", &target)) return nullptr;
  if (umount2(target, MNT_DETACH) != 0) return os_error_path("unmount", target);
  Py_RETURN_NONE;
}

// Makes new_root (a mount point) this mount namespace's root and lets go of the old one: from
// here on nothing outside the tree exists for this process or anything it starts.
PyObject* pivot_root(PyObject*, PyObject* args) {
  const char* new_root;
  if (!PyArg_ParseTuple(args, "s", &new_root)) return nullptr;
  // pivot_root(".", "."): the old root ends up stacked on the new one, and unmounting "."
  // then removes it (pivot_root(2), NOTES) without needing a directory to put it in.
  if (chdir(new_root) != 0) return os_error_path("chdir", new_root);
  if (syscall(SYS_pivot_root, ".", ".") != 0) return os_error("pivot_root");
  if (umount2(".", MNT_DETACH) != 0) return os_error("unmount the old root");
  if (chdir("/") != 0) return os_error("chdir /");
  Py_RETURN_NONE;
}

// --- landlock ---------------------------------------------------------------------------------
//
// A test (or the compiler) may use files beneath its root only, with every right there but
// ioctl on devices; TCP is denied; and (ABI 6+) it can neither signal nor reach an abstract
// socket of any process outside its own Landlock domain (the worker, the template). The kernel
// headers of the build machine may be older than the running kernel: the ABI's bits are here.

constexpr uint64_t kLandlockFsAbi1 = (1ULL << 13) - 1;  // EXECUTE ... MAKE_SYM
constexpr uint64_t kLandlockRefer = 1ULL << 13;         // ABI 2
constexpr uint64_t kLandlockTruncate = 1ULL << 14;      // ABI 3
constexpr uint64_t kLandlockIoctlDev = 1ULL << 15;      // ABI 5
constexpr uint64_t kLandlockNetTcp = 3;                 // ABI 4: BIND_TCP | CONNECT_TCP
constexpr uint64_t kLandlockScopes = 3;  // ABI 6: ABSTRACT_UNIX_SOCKET | SIGNAL
constexpr int kLandlockCreateVersion = 1;
constexpr int kLandlockRulePathBeneath = 1;

struct LandlockRulesetAttr {
  uint64_t handled_access_fs, handled_access_net, scoped;
};
struct __attribute__((packed)) LandlockPathBeneath {
  uint64_t allowed_access;
  int32_t parent_fd;
};

long landlock_abi_version() {
  long abi = syscall(SYS_landlock_create_ruleset, nullptr, 0, kLandlockCreateVersion);
  return abi < 0 ? 0 : abi;
}

PyObject* landlock_abi(PyObject*, PyObject*) { return PyLong_FromLong(landlock_abi_version()); }

PyObject* landlock_ruleset(PyObject*, PyObject* args) {
  const char* root;
  if (!PyArg_ParseTuple(args, "s", &root)) return nullptr;
  long abi = landlock_abi_version();
  if (abi < 1) return PyLong_FromLong(-1);  // kernel without Landlock
  LandlockRulesetAttr attr{kLandlockFsAbi1, 0, 0};
  if (abi >= 2) attr.handled_access_fs |= kLandlockRefer;
  if (abi >= 3) attr.handled_access_fs |= kLandlockTruncate;
  if (abi >= 5) attr.handled_access_fs |= kLandlockIoctlDev;
  if (abi >= 4) attr.handled_access_net = kLandlockNetTcp;
  if (abi >= 6) attr.scoped = kLandlockScopes;
  size_t size = abi >= 6 ? sizeof attr : abi >= 4 ? 2 * sizeof(uint64_t) : sizeof(uint64_t);
  int ruleset = static_cast<int>(syscall(SYS_landlock_create_ruleset, &attr, size, 0));
  if (ruleset < 0) return os_error("landlock_create_ruleset");
  int dir = open(root, O_PATH | O_CLOEXEC | O_DIRECTORY);
  LandlockPathBeneath rule{attr.handled_access_fs & ~kLandlockIoctlDev, dir};
  if (dir < 0 || syscall(SYS_landlock_add_rule, ruleset, kLandlockRulePathBeneath, &rule, 0)) {
    int saved = errno;
    if (dir >= 0) close(dir);
    close(ruleset);
    errno = saved;
    return os_error_path("landlock_add_rule", root);
  }
  close(dir);
  return PyLong_FromLong(ruleset);
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

PyObject* configure(PyObject*, PyObject* args, PyObject* kwargs) {
  const char *test_root, *test_cwd, *compile_root, *compile_cwd;
  int test_landlock, compile_landlock, drop_uid, unmapped, safe;
  unsigned int uid, gid;
  static const char* kwlist[] = {
      "test_root", "test_cwd", "compile_root", "compile_cwd", "test_landlock", "compile_landlock",
      "drop_uid",  "unmapped", "uid",          "gid",         "safe",          nullptr};
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "ssssiippIIp", const_cast<char**>(kwlist),
                                   &test_root, &test_cwd, &compile_root, &compile_cwd,
                                   &test_landlock, &compile_landlock, &drop_uid, &unmapped, &uid,
                                   &gid, &safe))
    return nullptr;
  for (const char* path : {test_root, test_cwd, compile_root, compile_cwd}) {
    if (strlen(path) >= PATH_MAX) return PyErr_Format(PyExc_ValueError, "path too long: %s", path);
  }
  if (safe && !g_policies_ready) return PyErr_Format(PyExc_RuntimeError, "policies not built");
  strcpy(g_test.root, test_root);
  strcpy(g_test.cwd, test_cwd);
  strcpy(g_compile.root, compile_root);
  strcpy(g_compile.cwd, compile_cwd);
  g_test.landlock = test_landlock;
  g_compile.landlock = compile_landlock;
  g_test.seccomp = safe != 0;
  g_compile.seccomp = false;  // g++ is trusted code; its root, uid and rlimits confine it
  g_drop_uid = drop_uid != 0;
  g_unmapped = unmapped != 0;
  g_uid = uid;
  g_gid = gid;
  Py_RETURN_NONE;
}

// --- entering the sandbox ---------------------------------------------------------------------

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
  int stdin_fd, stdout_w, stderr_w;
  // Set-up status: the errno of a failed step is written here (then exit); a successful set-up
  // closes it (at exec for a native test, before the solution runs for Python). A descriptor
  // of its own, so nothing the solution prints can pass for it.
  int status_w;
  const Confinement* how;
  const sock_fprog* policy;  // nullptr: no seccomp (unsafe mode, or the compiler)
};

void set_limit(int resource, unsigned long long soft, unsigned long long hard) {
  rlimit rl{static_cast<rlim_t>(soft), static_cast<rlim_t>(hard)};
  setrlimit(resource, &rl);
}

// The effective, permitted and inheritable sets emptied (the bounding set is already empty).
int clear_capabilities() {
  prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
  __user_cap_header_struct header{_LINUX_CAPABILITY_VERSION_3, 0};
  __user_cap_data_struct data[2] = {};
  return syscall(SYS_capset, &header, data) == 0 ? 0 : errno;
}

[[noreturn]] void setup_failed(int status_fd, int err) {
  (void)!write(status_fd, &err, sizeof err);
  _exit(120);
}

// The steps of enter_sandbox, in order: a failure reports (step << 16) | errno, and
// _executor.SETUP_STEPS names them (kStepNames, in the same order).
enum Step {
  kSetsid = 1,
  kStdio,
  kUserns,
  kChroot,
  kChdir,
  kNoNewPrivs,
  kLandlock,
  kBoundingSet,
  kSetgroups,
  kSetgid,
  kSetuid,
  kCapset,
  kSeccomp,
  kSelfFilter,
  kExec,
};

const char* const kStepNames[] = {
    "?",      "setsid",       "stdio",    "user namespace", "chroot", "chdir",
    "no_new_privs", "landlock", "bounding set", "setgroups", "setgid", "setuid",
    "capset", "seccomp",      "seccomp (self filter)", "exec"};
static_assert(sizeof kStepNames / sizeof kStepNames[0] == kExec + 1, "a name per step");

int failed(Step step) { return (step << 16) | (errno & 0xffff); }

// Runs in the test's process (a spare, or a vfork child that shares the worker's memory): only
// async-signal-safe calls, raw syscalls where glibc would touch state shared with the worker.
// Returns 0, or failed(step) (the caller must then report it and exit).
int enter_sandbox(const ChildSpec& s) {
  // A session of its own: no controlling terminal, now or ever (none exists in its tree).
  if (syscall(SYS_setsid) < 0) return failed(kSetsid);
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (dup2(s.stdin_fd, 0) < 0 || dup2(s.stdout_w, 1) < 0 || dup2(s.stderr_w, 2) < 0)
    return failed(kStdio);
  // Without root, the test gets a user namespace of its own with no uid mapped: it is nobody
  // there, and its capabilities (dropped below) never reach the worker's namespace. Before the
  // chroot: a chrooted process may not create one.
  if (g_unmapped && syscall(SYS_unshare, CLONE_NEWUSER) != 0) return failed(kUserns);
  const Confinement& how = *s.how;
  if (how.root[0] != '\0' && syscall(SYS_chroot, how.root) != 0) return failed(kChroot);
  if (syscall(SYS_chdir, how.cwd) != 0) return failed(kChdir);
  if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) return failed(kNoNewPrivs);
  if (how.landlock >= 0 && syscall(SYS_landlock_restrict_self, how.landlock, 0) != 0)
    return failed(kLandlock);
  // Nothing but stdio (and the status descriptor) survives: in particular not the worker's
  // channel to the executor, nor the template's.
  int status = s.status_w;
  if (status > 3) syscall(SYS_close_range, 3, status - 1, 0);
  syscall(SYS_close_range, status + 1, ~0U, 0);
  const Rlimits& l = s.limits;
  set_limit(RLIMIT_AS, l.address_space, l.address_space);
  set_limit(RLIMIT_CPU, l.cpu_s, l.cpu_s + 1);  // SIGXCPU, then SIGKILL a second later
  set_limit(RLIMIT_FSIZE, l.file_size, l.file_size);
  set_limit(RLIMIT_NOFILE, l.open_files, l.open_files);
  set_limit(RLIMIT_NPROC, l.processes, l.processes);
  set_limit(RLIMIT_STACK, l.stack, l.stack);
  set_limit(RLIMIT_CORE, 0, 0);
  set_limit(RLIMIT_MEMLOCK, 0, 0);
  set_limit(RLIMIT_MSGQUEUE, 0, 0);
  // Every capability dropped while we still may (CAP_SETPCAP), then the uid where it can change.
  for (int cap = 0; cap <= 63; cap++) {
    if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 && errno != EINVAL) return failed(kBoundingSet);
  }
  if (g_drop_uid) {
    // Raw syscalls: glibc's wrappers broadcast to threads, which a vfork child must not do.
    // Leaving uid 0 clears every capability.
    if (syscall(SYS_setgroups, 0, nullptr) != 0) return failed(kSetgroups);
    if (syscall(SYS_setresgid, g_gid, g_gid, g_gid) != 0) return failed(kSetgid);
    if (syscall(SYS_setresuid, g_uid, g_uid, g_uid) != 0) return failed(kSetuid);
  } else if (clear_capabilities() != 0) {
    return failed(kCapset);
  }
  if (s.policy != nullptr) {
    // The self filter first: it lets seccomp() through, the policy then decides it.
    sock_filter filter[kSelfFilterLen];
    sock_fprog self;
    self_filter(static_cast<pid_t>(syscall(SYS_getpid)), filter, &self);
    if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &self) != 0) return failed(kSelfFilter);
    if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, s.policy) != 0) return failed(kSeccomp);
  }
  return 0;
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

// --- spawn: a native test, or the compiler ----------------------------------------------------

struct NativeSpec {
  ChildSpec child;
  const char* path;
  char* const* argv;
  char* const* envp;
};

int native_child(void* arg) {
  const NativeSpec& n = *static_cast<const NativeSpec*>(arg);
  int err = enter_sandbox(n.child);
  if (err != 0) setup_failed(n.child.status_w, err);
  execve(n.path, n.argv, n.envp);
  setup_failed(n.child.status_w, failed(kExec));
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

// Four pipes' worth of descriptors for one test: [read, write] each, all close-on-exec.
struct Pipes {
  int out[2] = {-1, -1}, err[2] = {-1, -1}, status[2] = {-1, -1}, go[2] = {-1, -1};
  void close_all() {
    for (int* p : {out, err, status, go}) {
      for (int i = 0; i < 2; i++) {
        if (p[i] >= 0) close(p[i]);
        p[i] = -1;
      }
    }
  }
  bool open(bool with_go) {
    bool ok = pipe2(out, O_CLOEXEC) == 0 && pipe2(err, O_CLOEXEC) == 0 &&
              pipe2(status, O_CLOEXEC) == 0 && (!with_go || pipe2(go, O_CLOEXEC) == 0);
    if (!ok) {
      int saved = errno;
      close_all();
      errno = saved;
      return false;
    }
    fcntl(out[0], F_SETPIPE_SZ, 1 << 20);  // fewer wake-ups for large outputs; best effort
    fcntl(status[0], F_SETFL, O_NONBLOCK);
    return true;
  }
};

std::vector<char*> c_strings(PyObject* list, std::vector<std::string>& keep) {
  std::vector<char*> out;
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(list); i++) {
    const char* s = PyUnicode_AsUTF8(PyList_GET_ITEM(list, i));
    if (s == nullptr) return {};
    keep.emplace_back(s);
  }
  for (std::string& s : keep) out.push_back(s.data());
  out.push_back(nullptr);
  return out;
}

PyObject* spawn(PyObject*, PyObject* args, PyObject* kwargs) {
  int compile, allow_sub;
  const char *path, *stdin_data;
  Py_ssize_t stdin_len;
  PyObject *argv_list, *env_list;
  Rlimits l;
  static const char* kwlist[] = {"path",  "argv",    "env",
                                 "stdin", "rlimits", "allow_subprocesses",
                                 "compile", nullptr};
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "sO!O!y#O&pp", const_cast<char**>(kwlist), &path,
                                   &PyList_Type, &argv_list, &PyList_Type, &env_list,
                                   &stdin_data, &stdin_len, parse_rlimits, &l, &allow_sub,
                                   &compile))
    return nullptr;
  if (strlen(path) >= sizeof g_exec_path)
    return PyErr_Format(PyExc_ValueError, "executable path too long");
  std::vector<std::string> argv_keep, env_keep;
  std::vector<char*> argv = c_strings(argv_list, argv_keep);
  std::vector<char*> envp = c_strings(env_list, env_keep);
  if (PyErr_Occurred()) return nullptr;
  const Confinement& how = compile ? g_compile : g_test;
  if (how.seccomp && !g_policies_ready)
    return PyErr_Format(PyExc_RuntimeError, "policies not built");
  // The test's policy allows exec of exactly this address.
  strcpy(g_exec_path, path);
  if (!fill_stdin(stdin_data, stdin_len)) return os_error("stdin memfd");
  Pipes p;
  if (!p.open(false)) return os_error("pipe");
  NativeSpec spec{{l, g_stdin_ro, p.out[1], p.err[1], p.status[1], &how,
                   how.seccomp ? &g_policies[1][allow_sub] : nullptr},
                  g_exec_path,
                  argv.data(),
                  envp.data()};
  g_spawn_time = now_s();
  // CLONE_VM|CLONE_VFORK: no page tables are copied, whatever the worker's size; the worker
  // waits until the child has exec'd (or failed to).
  static char stack[64 * 1024] __attribute__((aligned(16)));
  pid_t pid = clone(native_child, stack + sizeof stack, CLONE_VM | CLONE_VFORK | SIGCHLD, &spec);
  int saved = errno;
  close(p.out[1]);
  close(p.err[1]);
  close(p.status[1]);
  if (pid < 0) {
    close(p.out[0]);
    close(p.err[0]);
    close(p.status[0]);
    errno = saved;
    return os_error("clone");
  }
  return Py_BuildValue("(iiii)", pid, p.out[0], p.err[0], p.status[0]);
}

// --- the template: every Python test's process comes from it ----------------------------------
//
// A fork of the worker made before any job (start_template): it never receives a test's input,
// a solution, or an output, so its memory holds nothing of any test. When the worker wants the
// next test's process (prefork), it sends the template that process's descriptors; the template
// clones a spare with CLONE_PARENT, so that the spare is the *worker's* child (the worker waits
// for it, reads its rusage) while its memory is the template's. The spare then waits for its
// test (await_go), which only the worker sends it (dispatch).

struct GoHeader {
  uint32_t payload_len;
  uint8_t allow_sub, pad[3];
  Rlimits limits;
};

struct Spare {
  pid_t pid = 0;
  // In the worker: the write end of go, the read ends of out/err/status.
  int go = -1, out = -1, err = -1, status = -1;
};
Spare g_spare;

// In a spare: its ends of the pipes (and stdin), received from the worker through the template.
enum { kGo, kOut, kErr, kStatus, kStdin, kSpareFds };
int g_spare_fds[kSpareFds] = {-1, -1, -1, -1, -1};

void close_spare() {
  for (int* fd : {&g_spare.go, &g_spare.out, &g_spare.err, &g_spare.status}) {
    if (*fd >= 0) close(*fd);
    *fd = -1;
  }
  g_spare.pid = 0;
}

void note_reaped(pid_t pid) {
  if (pid > 0 && pid == g_template_pid) g_template_dead = true;
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

PyObject* start_template(PyObject*, PyObject*) {
  if (g_template_pid > 0) return PyErr_Format(PyExc_RuntimeError, "template already started");
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0) return os_error("socketpair");
  PyOS_BeforeFork();
  pid_t pid = fork();
  if (pid == 0) {
    PyOS_AfterFork_Child();
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    prctl(PR_SET_NAME, "rlef-template");
    // Nothing of the worker's but what the template needs (its channel, the tests' Landlock
    // ruleset): not the executor's channel, not the stdin memfd.
    for (int fd = 3; fd < 4096; fd++) {
      if (fd != sv[1] && fd != g_test.landlock) close(fd);
    }
    g_template_sock = sv[1];
    g_template_pid = 0;
    return PyLong_FromLong(0);
  }
  PyOS_AfterFork_Parent();
  int saved = errno;
  close(sv[1]);
  if (pid < 0) {
    close(sv[0]);
    errno = saved;
    return os_error("fork");
  }
  g_template_sock = sv[0];
  g_template_pid = pid;
  return PyLong_FromLong(pid);
}

// In the template: serve the worker's requests for spares; returns (None) only in a spare.
PyObject* template_loop(PyObject*, PyObject*) {
  for (;;) {
    char byte;
    iovec iov{&byte, 1};
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kSpareFds)];
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    ssize_t n = recvmsg(g_template_sock, &msg, MSG_CMSG_CLOEXEC);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) _exit(0);  // the worker is gone
    int fds[kSpareFds] = {-1, -1, -1, -1, -1};
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    bool ok = c != nullptr && c->cmsg_type == SCM_RIGHTS &&
              c->cmsg_len == CMSG_LEN(sizeof(int) * kSpareFds);
    if (ok) memcpy(fds, CMSG_DATA(c), sizeof fds);
    int reply = -EINVAL;
    if (ok) {
      PyOS_BeforeFork();
      // A raw clone: glibc's fork() takes no flags. Single-threaded here, so no lock of libc's
      // is held; glibc reads the pid and tid from the kernel where it matters (raise).
      long pid = syscall(SYS_clone, CLONE_PARENT | SIGCHLD, 0, nullptr, nullptr, 0);
      if (pid == 0) {
        PyOS_AfterFork_Child();
        prctl(PR_SET_PDEATHSIG, SIGKILL);  // follows the worker, its parent
        prctl(PR_SET_NAME, "rlef-spare");
        close(g_template_sock);
        g_template_sock = -1;
        memcpy(g_spare_fds, fds, sizeof fds);
        Py_RETURN_NONE;
      }
      reply = pid > 0 ? static_cast<int>(pid) : -errno;
      PyOS_AfterFork_Parent();
    }
    for (int fd : fds) {
      if (fd >= 0) close(fd);
    }
    if (send(g_template_sock, &reply, sizeof reply, MSG_NOSIGNAL) != sizeof reply) _exit(0);
  }
}

PyObject* prefork(PyObject*, PyObject*) {
  if (g_spare.pid > 0) return PyLong_FromLong(g_spare.pid);
  if (g_template_pid <= 0 || g_template_dead)
    return PyErr_Format(PyExc_OSError, "the template process is gone");
  if (g_stdin_rw < 0 && !fill_stdin("", 0)) return os_error("stdin memfd");
  Pipes p;
  if (!p.open(true)) return os_error("pipe");
  // The spare's ends, in the order of kGo...kStdin.
  int fds[kSpareFds] = {p.go[0], p.out[1], p.err[1], p.status[1], g_stdin_ro};
  char byte = 'F';
  iovec iov{&byte, 1};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof fds)];
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof control;
  cmsghdr* c = CMSG_FIRSTHDR(&msg);
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_RIGHTS;
  c->cmsg_len = CMSG_LEN(sizeof fds);
  memcpy(CMSG_DATA(c), fds, sizeof fds);
  int reply = 0;
  ssize_t sent;
  Py_BEGIN_ALLOW_THREADS;
  do {
    sent = sendmsg(g_template_sock, &msg, MSG_NOSIGNAL);
  } while (sent < 0 && errno == EINTR);
  if (sent == 1) {
    ssize_t n;
    do {
      n = recv(g_template_sock, &reply, sizeof reply, 0);
    } while (n < 0 && errno == EINTR);
    if (n != sizeof reply) reply = 0;
  }
  Py_END_ALLOW_THREADS;
  for (int fd : {p.go[0], p.out[1], p.err[1], p.status[1]}) close(fd);
  if (reply <= 0) {
    for (int fd : {p.go[1], p.out[0], p.err[0], p.status[0]}) close(fd);
    if (reply < 0) {
      errno = -reply;
      return os_error("the template could not fork");
    }
    g_template_dead = true;
    return PyErr_Format(PyExc_OSError, "the template process is gone");
  }
  g_spare = {reply, p.go[1], p.out[0], p.err[0], p.status[0]};
  return PyLong_FromLong(reply);
}

PyObject* await_go(PyObject*, PyObject*) {
  GoHeader h;
  int go = g_spare_fds[kGo];
  // EOF: the worker is done with us (it exited, or dropped the spare).
  if (!read_all(go, &h, sizeof h)) _exit(0);
  PyObject* payload = PyBytes_FromStringAndSize(nullptr, h.payload_len);
  if (payload == nullptr || !read_all(go, PyBytes_AS_STRING(payload), h.payload_len)) _exit(0);
  prctl(PR_SET_NAME, "rlef-test");
  ChildSpec spec{h.limits,
                 g_spare_fds[kStdin],
                 g_spare_fds[kOut],
                 g_spare_fds[kErr],
                 g_spare_fds[kStatus],
                 &g_test,
                 g_test.seccomp ? &g_policies[0][h.allow_sub ? 1 : 0] : nullptr};
  int e = enter_sandbox(spec);
  if (e != 0) setup_failed(spec.status_w, e);
  // Set up: the status descriptor closes, and is all the worker learns of it.
  close(spec.status_w);
  end_when_out_of_memory();
  return payload;
}

PyObject* dispatch(PyObject*, PyObject* args, PyObject* kwargs) {
  GoHeader h{};
  int allow_sub;
  const char *stdin_data, *payload;
  Py_ssize_t stdin_len, payload_len;
  static const char* kwlist[] = {"allow_subprocesses", "stdin", "payload", "rlimits", nullptr};
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "py#y#O&", const_cast<char**>(kwlist),
                                   &allow_sub, &stdin_data, &stdin_len, &payload, &payload_len,
                                   parse_rlimits, &h.limits))
    return nullptr;
  if (g_spare.pid <= 0) return PyErr_Format(PyExc_RuntimeError, "no spare process");
  h.payload_len = static_cast<uint32_t>(payload_len);
  h.allow_sub = allow_sub;
  if (!fill_stdin(stdin_data, stdin_len)) return os_error("stdin memfd");
  g_spawn_time = now_s();
  bool sent = write_all(g_spare.go, &h, sizeof h) && write_all(g_spare.go, payload, payload_len);
  Spare spare = g_spare;
  close(spare.go);
  g_spare = Spare{};
  if (!sent) {  // the spare died waiting (killed from outside): the caller forks another
    kill(spare.pid, SIGKILL);
    waitpid(spare.pid, nullptr, 0);
    close(spare.out);
    close(spare.err);
    close(spare.status);
    Py_RETURN_NONE;
  }
  return Py_BuildValue("(iiii)", spare.pid, spare.out, spare.err, spare.status);
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

// Kills every process of the namespace but the worker (PID 1) and the template, and reaps them:
// what a test allowed to fork may have left (setsid'd grandchildren included). Rounds until
// none is left, since one may fork while the list is read.
void kill_all_but_ours() {
  for (int round = 0; round < 10000; round++) {
    bool any = false;
    if (DIR* proc = opendir("/proc")) {
      while (dirent* e = readdir(proc)) {
        char* end;
        long pid = strtol(e->d_name, &end, 10);
        if (*end != '\0' || pid <= 1 || pid == g_template_pid) continue;
        kill(static_cast<pid_t>(pid), SIGKILL);
        any = true;
      }
      closedir(proc);
    }
    pid_t reaped;
    while ((reaped = waitpid(-1, nullptr, WNOHANG)) > 0) note_reaped(reaped);
    if (!any) return;
    usleep(200);
  }
}

PyObject* supervise(PyObject*, PyObject* args, PyObject* kwargs) {
  int pid, out_fd, err_fd, status_fd, everything;
  double wall_limit;
  Py_ssize_t out_cap, err_cap;
  static const char* kwlist[] = {"pid",          "stdout_fd",  "stderr_fd",  "status_fd",
                                 "wall_limit_s", "stdout_cap", "stderr_cap", "everything",
                                 nullptr};
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "iiiidnnp", const_cast<char**>(kwlist), &pid,
                                   &out_fd, &err_fd, &status_fd, &wall_limit, &out_cap, &err_cap,
                                   &everything))
    return nullptr;
  Capture out{out_fd, {}, static_cast<size_t>(out_cap), false};
  Capture err{err_fd, {}, static_cast<size_t>(err_cap), true};
  fcntl(out_fd, F_SETFL, O_NONBLOCK);
  fcntl(err_fd, F_SETFL, O_NONBLOCK);
  int pidfd = static_cast<int>(syscall(SYS_pidfd_open, pid, 0));
  double start = g_spawn_time > 0 ? g_spawn_time : now_s(), deadline = start + wall_limit;
  g_spawn_time = 0;
  Reason reason = kExited;
  int status = 0, setup_errno = 0;
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
  // The test's process and its threads; with subprocesses (or the compiler), everything else
  // of the namespace but the worker and the template.
  kill(pid, SIGKILL);
  if (!reaped) {
    while (wait4(pid, &status, 0, &ru) < 0 && errno == EINTR) {
    }
  }
  if (everything) kill_all_but_ours();
  // Output written just before exit is still in the pipes.
  if (out.open) pump(out);
  if (err.open) pump(err);
  if (out.over && reason == kExited) reason = kOutputCap;
  if (err.data.size() > err.cap) err.data.erase(0, err.data.size() - err.cap);
  if (status_fd >= 0) {
    int e = 0;
    if (read(status_fd, &e, sizeof e) == static_cast<ssize_t>(sizeof e)) setup_errno = e ? e : -1;
  }
  Py_END_ALLOW_THREADS;

  if (pidfd >= 0) close(pidfd);
  close(out_fd);
  close(err_fd);
  if (status_fd >= 0) close(status_fd);
  int code = WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
  double cpu = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec * 1e-6 + ru.ru_stime.tv_sec +
               ru.ru_stime.tv_usec * 1e-6;
  return Py_BuildValue("{s:i,s:i,s:d,s:d,s:l,s:y#,s:y#,s:O,s:i}", "reason", reason, "code", code,
                       "wall_s", wall, "cpu_s", cpu, "max_rss_kb", ru.ru_maxrss, "stdout",
                       out.data.data(), static_cast<Py_ssize_t>(out.data.size()), "stderr",
                       err.data.data(), static_cast<Py_ssize_t>(err.data.size()), "stderr_over",
                       PyBool_FromLong(err.over), "setup_errno", setup_errno);
}

PyObject* template_alive(PyObject*, PyObject*) {
  if (g_template_pid > 0 && !g_template_dead) {
    pid_t r = waitpid(g_template_pid, nullptr, WNOHANG);
    note_reaped(r);
  }
  return PyBool_FromLong(g_template_pid > 0 && !g_template_dead);
}

#define METHOD(name, flags, doc) \
  {#name, reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(name)), flags, doc}

PyMethodDef kMethods[] = {
    METHOD(isolate, METH_VARARGS,
           "isolate(cpu) -> dict: become PID 1 of new namespaces, pinned to `cpu` (-1: not)."),
    METHOD(mount_tmpfs, METH_VARARGS, "mount_tmpfs(target, options, readonly=False)"),
    METHOD(mount_proc, METH_VARARGS, "mount_proc(target): this PID namespace's /proc."),
    METHOD(bind, METH_VARARGS, "bind(source, target, readonly=True): non-recursive bind mount."),
    METHOD(remount_readonly, METH_VARARGS, "remount_readonly(target)"),
    METHOD(unmount, METH_VARARGS, "unmount(target): lazily (MNT_DETACH)."),
    METHOD(pivot_root, METH_VARARGS, "pivot_root(new_root): make it / and drop the old root."),
    METHOD(landlock_abi, METH_NOARGS, "landlock_abi() -> int: 0 without Landlock."),
    METHOD(landlock_ruleset, METH_VARARGS,
           "landlock_ruleset(root) -> fd: files beneath root only (-1: no Landlock)."),
    METHOD(build_policies, METH_NOARGS, "Build the seccomp filters (once)."),
    METHOD(seccomp_available, METH_NOARGS, "Whether seccomp filters can be used."),
    METHOD(configure, METH_VARARGS | METH_KEYWORDS,
           "configure(test_root, test_cwd, compile_root, compile_cwd, test_landlock,"
           " compile_landlock, drop_uid, unmapped, uid, gid, safe): how tests and the compiler"
           " are confined."),
    METHOD(spawn, METH_VARARGS | METH_KEYWORDS,
           "spawn(path, argv, env, stdin, rlimits, allow_subprocesses, compile)"
           " -> (pid, stdout_fd, stderr_fd, status_fd): a native test, or the compiler."),
    METHOD(start_template, METH_NOARGS,
           "start_template() -> pid: fork the template; 0 in the template."),
    METHOD(template_loop, METH_NOARGS,
           "In the template: fork spares on request; returns only in a spare."),
    METHOD(template_alive, METH_NOARGS, "Whether the template process still runs."),
    METHOD(prefork, METH_NOARGS, "prefork() -> pid: have the template fork the next spare."),
    METHOD(await_go, METH_NOARGS,
           "In a spare: wait for the test, enter the sandbox, return the worker's payload."),
    METHOD(dispatch, METH_VARARGS | METH_KEYWORDS,
           "dispatch(allow_subprocesses, stdin, payload, rlimits)"
           " -> (pid, stdout_fd, stderr_fd, status_fd), or None if the spare is gone."),
    METHOD(drop_spare, METH_NOARGS, "Kill and reap the spare, if any."),
    METHOD(supervise, METH_VARARGS | METH_KEYWORDS,
           "supervise(pid, stdout_fd, stderr_fd, status_fd, wall_limit_s, stdout_cap,"
           " stderr_cap, everything) -> dict"),
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
  PyObject* steps = PyTuple_New(kExec + 1);
  for (int i = 0; steps != nullptr && i <= kExec; i++)
    PyTuple_SET_ITEM(steps, i, PyUnicode_FromString(kStepNames[i]));
  if (steps == nullptr || PyModule_AddObject(module, "SETUP_STEPS", steps) != 0) {
    Py_XDECREF(steps);
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
