"""The server's one-time set-up: isolation (namespaces, seccomp policies, uid drop, Landlock),
its directories, and an environment with nothing of the executor's in it."""

from __future__ import annotations

import os
import stat
import sys
from dataclasses import dataclass

from rlef_hpc.sandbox import _executor
from rlef_hpc.sandbox.protocol import Capabilities, ServerConfig


@dataclass(frozen=True)
class Sandbox:
    """What the set-up achieved, and where the server's tests and compiles work."""

    capabilities: Capabilities
    scratch: str
    cache_dir: str  # C++ binaries, shared with the other servers
    uid: int
    gid: int
    drop_uid: bool  # tests run as uid/gid (needs real root)
    safe: bool  # tests load the seccomp policy
    workdir: str  # a test's working directory, emptied after each test
    bindir: str  # C++ binaries as tests exec them
    compiledir: str
    compile_landlock: int  # the compiler's Landlock ruleset (-1: none)


def set_up(config: ServerConfig) -> Sandbox:
    """Isolates this process (see csrc/executor.cc: isolate) and prepares its directories."""
    scratch, cache_dir = config["scratch"], config["cache_dir"]
    uid, gid = config["uid"], config["gid"]
    caps = Capabilities(
        user_ns=False,
        pid_ns=False,
        net_ns=False,
        ipc_ns=False,
        mount_ns=False,
        uts_ns=False,
        proc_private=False,
        readonly_root=False,
        scratch_tmpfs=False,
        landlock=False,
        seccomp=False,
        uid_drop=False,
        rlimits=True,
    )
    if config["isolate"]:
        try:
            achieved = _executor.isolate(scratch, [cache_dir], config["scratch_mb"])
            caps.update(achieved)  # type: ignore[typeddict-item]
        except OSError as e:
            caps["isolation_error"] = str(e)
    if config["seccomp"] and _executor.seccomp_available():
        _executor.build_policies()
        caps["seccomp"] = True
    # Dropping to a per-server uid needs real root: in a user namespace only one uid exists.
    drop_uid = os.geteuid() == 0 and not caps["user_ns"]
    caps["uid_drop"] = drop_uid
    workdir = os.path.join(scratch, "work")
    bindir = os.path.join(scratch, "bin")
    compiledir = os.path.join(scratch, "compile")
    for d in (workdir, bindir, compiledir):
        os.makedirs(d, exist_ok=True)
        if drop_uid and d != bindir:
            os.chown(d, uid, gid)
    compile_landlock = _executor.landlock_ruleset(compiledir)
    test_landlock = _executor.landlock_ruleset(workdir)
    _executor.set_test_landlock(test_landlock)
    caps["landlock"] = test_landlock >= 0
    if drop_uid and caps["mount_ns"]:
        _expose_python_path(scratch)
    os.chdir(workdir)
    os.environ.clear()
    os.environ.update({"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir})
    return Sandbox(
        capabilities=caps,
        scratch=scratch,
        cache_dir=cache_dir,
        uid=uid,
        gid=gid,
        drop_uid=drop_uid,
        safe=caps["seccomp"],
        workdir=workdir,
        bindir=bindir,
        compiledir=compiledir,
        compile_landlock=compile_landlock,
    )


def _expose_python_path(scratch: str) -> None:
    """Makes the interpreter's library directories importable by the sandbox uid.

    Python often lives under a home directory the uid cannot enter (pyenv in /root, conda
    in ~). Each such sys.path entry is bound, read-only, under the scratch directory and
    sys.path points there instead, so `import ctypes` in a test finds it."""
    import importlib

    moved = {}
    for i, entry in enumerate(sys.path):
        if not os.path.isdir(entry) or _world_reachable(entry):
            continue
        view = os.path.join(scratch, "pylib", str(i))
        os.makedirs(view, exist_ok=True)
        _executor.bind_readonly(entry, view)
        sys.path[i] = moved[entry.rstrip("/") + "/"] = view
    # Packages already imported (encodings, email, ...) find submodules via __path__.
    for module in list(sys.modules.values()):
        search = getattr(module, "__path__", None)
        if not isinstance(search, list):
            continue
        for j, path in enumerate(search):
            for old, view in moved.items():
                if path.startswith(old):
                    search[j] = os.path.join(view, path[len(old) :])
    sys.path_importer_cache.clear()
    importlib.invalidate_caches()


def _world_reachable(path: str) -> bool:
    """Whether a uid that is neither owner nor group can list `path` (and so import from it)."""
    path = os.path.abspath(path)
    if os.stat(path).st_mode & (stat.S_IROTH | stat.S_IXOTH) != (stat.S_IROTH | stat.S_IXOTH):
        return False
    while path != "/":
        path = os.path.dirname(path)
        if not os.stat(path).st_mode & stat.S_IXOTH:
            return False
    return True
