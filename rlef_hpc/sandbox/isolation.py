"""The server's one-time set-up: namespaces, the file trees it and its tests see, seccomp
policies, Landlock, and an environment with nothing of the executor's in it.

Three trees, each a tmpfs of its own built from bind mounts of single host paths (never a
recursive bind, so nothing mounted beneath a path comes along), then made read-only:

- the worker's (W), which it pivot_root()s onto: the interpreter's standard library and the
  shared libraries it loads, this package's `sandbox/` code, `/proc` of its PID namespace, the
  C++ cache, and its scratch tmpfs, which holds the other two trees;
- a test's (T), which every test's process chroot()s into: the standard library and its shared
  libraries, `/etc/passwd` and `/etc/group` of one line each, `/etc/ld.so.cache`, `/dev/null`,
  `zero`, `full`, `random`, `urandom`, the test's binary (`/solution/prog`, C++ only) and a
  fresh tmpfs `/tmp`, its working directory;
- the compiler's (C): `/usr` (but `/usr/local`) and the `/bin`, `/lib*` that lead into it, the
  precompiled header and exec guard (`/toolchain`), `/dev/null`, `/etc/ld.so.cache` and its own
  `/tmp`.

Every Python package directory (site-packages, dist-packages, this project) that falls inside a
bound path is hidden under an empty tmpfs: no tree holds the project's data, its problems, a
run directory, /home, /root (but the interpreter's files under it) or the host's /etc.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass

from rlef_hpc.sandbox import _executor
from rlef_hpc.sandbox.protocol import Capabilities, ServerConfig

DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
# What leads from / to the toolchain: merged-/usr systems have symlinks here, others directories.
SYSTEM_DIRS = ("/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32", "/usr")
# Files that are empty directories' worth of memory: the tree's own skeleton.
TREE_OPTIONS = "size=1m,nr_inodes=4096,mode=0755"
# Where a test and the compiler work, as they see it (csrc: enter_sandbox chdirs there).
TEST_TMP = "/tmp"
SOLUTION = "/solution/prog"  # a C++ test's binary, as the test sees it
TOOLCHAIN = "/toolchain"  # the precompiled header and exec guard, as the compiler sees them


class SandboxSetupError(RuntimeError):
    """The sandbox, not the solution, failed (a test's process could not enter it, the template
    is gone, the tests' /tmp could not be cleared): the server must not serve on."""


def supervise(
    started: tuple[int, int, int, int],
    *,
    wall_limit_s: float,
    stdout_cap: int,
    stderr_cap: int,
    everything: bool,
    who: str,
) -> dict:
    """csrc: supervise() on a process spawn()/dispatch() started; raises SandboxSetupError if it
    never got into the sandbox (its status descriptor says which step failed, and why: nothing
    it could print passes for that, the descriptor is closed before the solution runs)."""
    pid, out_fd, err_fd, status_fd = started
    obs = _executor.supervise(
        pid=pid,
        stdout_fd=out_fd,
        stderr_fd=err_fd,
        status_fd=status_fd,
        wall_limit_s=wall_limit_s,
        stdout_cap=stdout_cap,
        stderr_cap=stderr_cap,
        everything=everything,
    )
    if code := obs["setup_errno"]:
        step, err = code >> 16, code & 0xFFFF
        steps = _executor.SETUP_STEPS  # csrc/executor.cc: enum Step, by name
        name = steps[step] if 0 < step < len(steps) else "?"
        raise SandboxSetupError(f"{who} could not enter the sandbox: {name}: {os.strerror(err)}")
    return obs


@dataclass(frozen=True)
class Sandbox:
    """What the set-up achieved, and where things are as the server sees them."""

    capabilities: Capabilities
    scratch: str
    cache_dir: str  # C++ binaries, shared with the other servers
    uid: int  # the uid/gid tests and the compiler run as, with real root
    gid: int
    drop_uid: bool  # real root: tests run as uid/gid
    unmapped: bool  # user namespace: tests run as an unmapped uid in a namespace of their own
    safe: bool  # tests load the seccomp policy
    workdir: str  # the tests' /tmp, remounted after a test that left anything in it
    tmp_options: str  # its tmpfs options
    bindir: str  # compiled binaries, outside every test's reach
    solution_dir: str  # the tests' /solution: the current C++ job's binary only
    solution_exec: str  # its binary as a test execs it
    compiledir: str  # the compiler's /tmp
    compile_cwd: str  # the same, as the compiler sees it
    toolchain: str  # the compiler's /toolchain, a mount point ("": none, use the cache itself)


def set_up(config: ServerConfig) -> Sandbox:
    """Isolates this process (see csrc/executor.cc) and builds its trees. Whatever fails is
    recorded in the capabilities (the executor refuses what the caller requires)."""
    scratch = config["scratch"]
    uid, gid = config["uid"], config["gid"]
    caps = Capabilities(
        user_ns=False,
        pid_ns=False,
        net_ns=False,
        ipc_ns=False,
        mount_ns=False,
        uts_ns=False,
        cgroup_ns=False,
        proc_private=False,
        minimal_root=False,
        landlock=False,
        landlock_scoped=False,
        seccomp=False,
        uid_drop=False,
        unmapped_uid=False,
        no_tty=True,  # every test's process starts a session of its own (csrc: enter_sandbox)
        cpu_pinned=False,
        rlimits=True,
    )
    if config["seccomp"] and _executor.seccomp_available():
        _executor.build_policies()
        caps["seccomp"] = True
    root_mode = os.geteuid() == 0
    tmp = tmp_options(config, root_mode)
    try:
        achieved = _executor.isolate(config["cpu"])
        caps["cpu_pinned"] = achieved.pop("cpu") >= 0
        caps.update(achieved)  # type: ignore[typeddict-item]
        _build_trees(config, tmp, root_mode)
        caps["minimal_root"] = caps["proc_private"] = True
        test_root, compile_root = scratch + "/t", scratch + "/c"
        workdir = test_root + TEST_TMP
        test_cwd = compile_cwd = TEST_TMP
        solution_exec = SOLUTION
    except OSError as e:
        caps["isolation_error"] = str(e)
        # No tree: tests work in a directory of the host's, with rlimits and seccomp only
        # (the executor refuses this unless the caller named what may be missing).
        test_root = compile_root = ""
        workdir = test_cwd = os.path.join(scratch, "tmp")
        compile_cwd = os.path.join(scratch, "compile")
        solution_exec = os.path.join(scratch, "solution", "prog")
        for sub in ("tmp", "bin", "compile", "solution"):
            os.makedirs(os.path.join(scratch, sub), exist_ok=True)
    drop_uid = root_mode and not caps["user_ns"]
    unmapped = caps["user_ns"] and caps["minimal_root"]
    caps["uid_drop"], caps["unmapped_uid"] = drop_uid, unmapped
    compiledir = os.path.join(scratch, "compile")
    if drop_uid:
        os.chown(compiledir, uid, gid)
        if not caps["minimal_root"]:
            os.chown(workdir, uid, gid)
    test_landlock = compile_landlock = -1
    if caps["minimal_root"]:
        test_landlock = _executor.landlock_ruleset(test_root)
        compile_landlock = _executor.landlock_ruleset(compile_root)
    caps["landlock"] = test_landlock >= 0
    caps["landlock_scoped"] = caps["landlock"] and _executor.landlock_abi() >= 6
    _executor.configure(
        test_root=test_root,
        test_cwd=test_cwd,
        compile_root=compile_root,
        compile_cwd=compile_cwd,
        test_landlock=test_landlock,
        compile_landlock=compile_landlock,
        drop_uid=drop_uid,
        unmapped=unmapped,
        uid=uid,
        gid=gid,
        safe=caps["seccomp"],
    )
    os.chdir(scratch)
    os.environ.clear()
    os.environ.update({"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": TEST_TMP})
    return Sandbox(
        capabilities=caps,
        scratch=scratch,
        cache_dir=config["cache_dir"],
        uid=uid,
        gid=gid,
        drop_uid=drop_uid,
        unmapped=unmapped,
        safe=caps["seccomp"],
        workdir=workdir,
        tmp_options=tmp,
        bindir=os.path.join(scratch, "bin"),
        solution_dir=os.path.join(scratch, "solution"),
        solution_exec=solution_exec,
        compiledir=compiledir,
        compile_cwd=compile_cwd,
        toolchain=compile_root + TOOLCHAIN if compile_root else "",
    )


def tmp_options(config: ServerConfig, root_mode: bool) -> str:
    """The tests' /tmp: bounded in bytes and inodes (memory a test holds there is outside its
    RLIMIT_AS), private to the uid the tests run as."""
    owner = f",uid={config['uid']},gid={config['gid']}" if root_mode else ""
    return f"size={config['tmp_mb']}m,nr_inodes={config['tmp_inodes']},mode=0700{owner}"


class Tree:
    """A file tree under `root` (a tmpfs) made of bind mounts of host paths at the same paths,
    with the symlinks that lead to them; `masks` are hidden wherever they fall inside."""

    def __init__(self, root: str, masks: Sequence[str]) -> None:
        self.root = root
        self.masks = masks
        self.bound: list[str] = []

    def _covered(self, path: str) -> bool:
        return any(path == b or path.startswith(b + "/") for b in self.bound)

    def place(self, host_path: str) -> str | None:
        """Mirrors the directories and symlinks on the way to host_path; returns the host path
        it resolves to, or None if that lies in a path already bound (or does not exist)."""
        parts = [p for p in host_path.split("/") if p]
        done, hops = "", 0
        while parts:
            name = parts.pop(0)
            if name == ".":
                continue
            if name == "..":
                done = os.path.dirname(done) if done != "/" else ""
                done = "" if done == "/" else done
                continue
            cur = f"{done}/{name}"
            if self._covered(cur):
                return None  # the kernel resolves the rest inside that bind
            try:
                st = os.lstat(cur)
            except FileNotFoundError:
                return None
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(cur)
                link = self.root + cur
                if not os.path.lexists(link):
                    os.symlink(target, link)
                hops += 1
                if hops > 40:
                    raise OSError(errno.ELOOP, "too many symlinks", host_path)
                parts = [p for p in target.split("/") if p] + parts
                if target.startswith("/"):
                    done = ""
                continue
            if parts and not os.path.isdir(self.root + cur):
                os.mkdir(self.root + cur, 0o755)
            done = cur
        return done or None

    def bind(self, host_path: str, readonly: bool = True) -> None:
        real = self.place(host_path)
        if real is None or real in self.masks:
            return
        target = self.root + real
        if os.path.isdir(real):
            os.makedirs(target, mode=0o755, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
            if not os.path.exists(target):
                os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o444))
        _executor.bind(real, target, readonly)
        self.bound.append(real)
        for mask in self.masks:
            if mask.startswith(real + "/") and os.path.isdir(mask):
                _executor.mount_tmpfs(self.root + mask, "size=4k,nr_inodes=1,mode=0555", True)

    def mkdir(self, path: str, mode: int = 0o755) -> str:
        os.makedirs(self.root + path, mode=mode, exist_ok=True)
        return self.root + path

    def write(self, path: str, text: str) -> None:
        os.makedirs(os.path.dirname(self.root + path), mode=0o755, exist_ok=True)
        with open(self.root + path, "w") as f:
            f.write(text)
        os.chmod(self.root + path, 0o444)


def _build_trees(config: ServerConfig, tmp: str, root_mode: bool) -> None:
    scratch, masks = config["scratch"], config["masks"]
    w = Tree(scratch, masks)  # mounted on the scratch directory, then pivoted onto
    _executor.mount_tmpfs(scratch, TREE_OPTIONS)
    language = [*config["python_paths"], *config["lib_paths"], "/etc/ld.so.cache"]
    for path in [*language, config["package_dir"]]:
        w.bind(path)
    for device in DEVICES:
        w.bind(device, readonly=False)
    _executor.mount_proc(w.mkdir("/proc"))
    w.bind(config["cache_dir"], readonly=False)
    s = w.mkdir(scratch, 0o700)
    _executor.mount_tmpfs(s, f"size={config['scratch_mb']}m,mode=0700")
    for sub in ("bin", "compile", "solution", "t", "c"):
        os.mkdir(os.path.join(s, sub), 0o755)

    uid, gid = (config["uid"], config["gid"]) if root_mode else (65534, 65534)
    t = Tree(s + "/t", masks)
    _executor.mount_tmpfs(t.root, TREE_OPTIONS)
    for path in language:
        t.bind(path)
    for device in DEVICES:
        t.bind(device, readonly=False)
    t.write("/etc/passwd", f"sandbox:x:{uid}:{gid}:sandbox:{TEST_TMP}:/nonexistent\n")
    t.write("/etc/group", f"sandbox:x:{gid}:\n")
    _executor.mount_tmpfs(t.mkdir(TEST_TMP), tmp)
    _executor.bind(s + "/solution", t.mkdir(os.path.dirname(SOLUTION)), True)
    _executor.remount_readonly(t.root)

    # The compiler needs /usr's toolchain, never what a site keeps in /usr/local.
    c = Tree(s + "/c", [*masks, "/usr/local"])
    _executor.mount_tmpfs(c.root, TREE_OPTIONS)
    for path in (*SYSTEM_DIRS, "/etc/ld.so.cache"):
        c.bind(path)
    c.bind("/dev/null", readonly=False)
    _executor.bind(s + "/compile", c.mkdir(TEST_TMP), False)
    c.mkdir(TOOLCHAIN)
    _executor.remount_readonly(c.root)

    _executor.remount_readonly(scratch)
    _executor.pivot_root(scratch)
