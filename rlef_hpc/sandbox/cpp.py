"""C++ solutions: compiled once per distinct source inside a worker, cached on disk by hash.

Every binary is static (faster to start, no loader to trust) and has the exec guard linked in
first; `#include <bits/stdc++.h>` hits a precompiled header built once per compiler. The
compiler reads untrusted source, so it runs as the sandbox uid, inside the worker's namespaces,
under rlimits and a deadline; only the worker copies its output into the shared cache.
"""

from __future__ import annotations

import fcntl
import os
import resource
import shutil
from collections.abc import Sequence

from rlef_hpc import atomic
from rlef_hpc.sandbox import _executor

CXX = "g++"
CXX_FLAGS = ("-std=gnu++17", "-O2", "-pipe")
LINK_FLAGS = ("-static",)
COMPILE_TIME_S = 30
COMPILE_MEMORY = 4 << 30
MESSAGE_BYTES = 8192
_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C"}


class CompileError(Exception):
    """The solution does not compile; the message is the compiler's (tail)."""


def run_command(
    argv: Sequence[str],
    cwd: str,
    *,
    uid: int | None = None,
    landlock: int = -1,
    timeout_s: float = COMPILE_TIME_S,
) -> tuple[int, bytes, bytes]:
    """Runs a trusted program (the compiler) under rlimits, optionally as `uid` and confined by
    a Landlock ruleset, killing its whole process tree at the deadline. os.fork rather than
    subprocess: subprocess would load threading into the worker, and every Python module there
    makes each test's fork slower."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child execs or exits
        try:
            os.setpgid(0, 0)
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            _executor.landlock_apply(landlock)
            os.closerange(3, 1 << 16)
            for res, value in (
                (resource.RLIMIT_CPU, int(timeout_s)),
                (resource.RLIMIT_AS, COMPILE_MEMORY),
                (resource.RLIMIT_FSIZE, 256 << 20),
            ):
                resource.setrlimit(res, (value, value))
            if uid is not None:
                os.setgroups([])
                os.setresgid(uid, uid, uid)
                os.setresuid(uid, uid, uid)
            os.chdir(cwd)
            os.execvpe(argv[0], list(argv), {**_ENV, "TMPDIR": cwd})
        finally:
            os._exit(127)
    os.close(out_w)
    os.close(err_w)
    obs = _executor.supervise(
        pid=pid,
        stdout_fd=out_r,
        stderr_fd=err_r,
        wall_limit_s=timeout_s,
        stdout_cap=1 << 24,
        stderr_cap=MESSAGE_BYTES,
    )
    if obs["reason"] == 1:
        return -1, obs["stdout"], b"compilation timed out\n" + obs["stderr"]
    return obs["code"], obs["stdout"], obs["stderr"]


def _check(argv: Sequence[str], cwd: str) -> bytes:
    code, out, err = run_command(argv, cwd)
    if code != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({code}): {err.decode(errors='replace')}")
    return out


class Compiler:
    """Compiles solutions into `cache_dir`, shared by all workers (and runs) on the machine.

    `view` is where the compiler (running as `uid`) sees the toolchain directory: the cache
    itself may sit under a home directory that uid cannot enter, so the worker binds it, read-
    only, inside its scratch space.
    """

    def __init__(
        self,
        cache_dir: str,
        workdir: str,
        uid: int | None,
        view: str | None = None,
        landlock: int = -1,
    ) -> None:
        self.workdir = workdir  # writable by `uid`: the untrusted compile happens here
        self.uid = uid
        self.landlock = landlock  # confines the untrusted compile's writes to workdir
        import hashlib

        self._sha256 = hashlib.sha256
        version = _check([CXX, "--version"], workdir)
        tag = self._sha256(version + " ".join(CXX_FLAGS + LINK_FLAGS).encode()).hexdigest()[:16]
        self.dir = os.path.join(cache_dir, f"cxx-{tag}")
        for sub in ("bin", "err", "locks", "pch/bits"):
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        self.guard = os.path.join(self.dir, "exec_guard.o")
        with self._lock("toolchain"):
            self._build_toolchain()
        self.view = self.dir
        if view is not None:
            os.makedirs(view, exist_ok=True)
            _executor.bind_readonly(self.dir, view)
            self.view = view

    def _lock(self, name: str) -> _FileLock:
        return _FileLock(os.path.join(self.dir, "locks", f"{name}.lock"))

    def _build_toolchain(self) -> None:
        if not os.path.exists(self.guard):
            src = os.path.join(os.path.dirname(__file__), "exec_guard.c")
            with atomic.replacing(self.guard) as tmp:
                _check(["gcc", "-O2", "-c", src, "-o", str(tmp)], self.workdir)
        pch = os.path.join(self.dir, "pch", "bits", "stdc++.h.gch")
        if not os.path.exists(pch):
            probe = os.path.join(self.workdir, "probe.cpp")
            with open(probe, "w") as f:
                f.write("#include <bits/stdc++.h>\n")
            deps = _check([CXX, *CXX_FLAGS, "-M", probe], self.workdir).decode().split()
            os.unlink(probe)
            header = next(d for d in deps if d.endswith("bits/stdc++.h"))
            with atomic.replacing(pch) as tmp:
                _check([CXX, *CXX_FLAGS, "-x", "c++-header", header, "-o", str(tmp)], self.workdir)

    def binary(self, source: str) -> str:
        """Path of the compiled, cached binary for `source`; raises CompileError."""
        key = self._sha256(source.encode()).hexdigest()
        cached = os.path.join(self.dir, "bin", key)
        failed = os.path.join(self.dir, "err", key)
        if not os.path.exists(cached) and not os.path.exists(failed):
            with self._lock(key):  # two workers given the same source compile it once
                if not os.path.exists(cached) and not os.path.exists(failed):
                    self._compile(source, cached, failed)
        if os.path.exists(failed):
            with open(failed, encoding="utf-8", errors="replace") as f:
                raise CompileError(f.read())
        return cached

    def _compile(self, source: str, cached: str, failed: str) -> None:
        src = os.path.join(self.workdir, "solution.cpp")
        out = os.path.join(self.workdir, "solution")
        with open(src, "w") as f:
            f.write(source)
        pch_dir = os.path.join(self.view, "pch")
        guard = os.path.join(self.view, "exec_guard.o")
        argv = [
            CXX,
            *CXX_FLAGS,
            "-I",
            pch_dir,
            guard,
            "solution.cpp",
            *LINK_FLAGS,
            "-o",
            "solution",
        ]
        try:
            code, _, err = run_command(argv, self.workdir, uid=self.uid, landlock=self.landlock)
            if code != 0 and b"solution.cpp" not in err:
                # Not the solution's fault (no compiler, no memory, a broken toolchain): never
                # cache it as a compile error, let the caller see it.
                raise RuntimeError(f"C++ toolchain failed ({code}): {err.decode(errors='replace')}")
            with atomic.replacing(cached if code == 0 else failed) as tmp:
                if code == 0:
                    shutil.copyfile(out, tmp)
                    os.chmod(tmp, 0o755)
                else:
                    text = err.decode(errors="replace").replace(pch_dir + "/", "")
                    tmp.write_text(text or f"compiler exited with status {code}\n")
        finally:
            for p in (src, out):
                if os.path.exists(p):
                    os.unlink(p)


class _FileLock:
    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self) -> None:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)  # closing releases the lock
