"""C++ solutions: compiled once per distinct source inside a worker, cached on disk by hash.

Every binary is static (faster to start, no loader to trust) and has the exec guard linked in
first; `#include <bits/stdc++.h>` hits a precompiled header built once per compiler. The
compiler reads untrusted source, so it runs confined like a test (csrc: spawn with
compile=True): chrooted into the compiler's tree (/usr, the toolchain, its /tmp: no /dev but
null, no /proc, nothing of the project), as the sandbox uid (or capless, without root), under
rlimits (address space, CPU, file size, processes) and a wall-clock deadline, with its whole
process tree killed at the end. Whatever it does with a solution's source (an error, a timeout,
running out of memory, `#include "/dev/zero"`) is that source's COMPILE_ERROR, cached like any
other: only the worker copies its output into the shared cache.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
from collections.abc import Sequence

from rlef_hpc.sandbox import _executor
from rlef_hpc.sandbox.isolation import TOOLCHAIN, supervise
from rlef_hpc.sandbox.rlimits import Rlimits

CXX = "g++"
CXX_FLAGS = ("-std=gnu++17", "-O2", "-pipe")
LINK_FLAGS = ("-static",)
BIN = "/usr/bin"  # where the compiler driver is, in the compiler's tree as on the host
# A solution's compile: g++ with the precompiled header needs ~300 MB and well under a second.
COMPILE_LIMITS = Rlimits(
    address_space=2 << 30,
    cpu_s=20,
    file_size=64 << 20,
    open_files=256,
    processes=16,
    stack=64 << 20,
)
COMPILE_WALL_S = 30.0
# Building the precompiled header (trusted input) takes longer and writes ~100 MB.
TOOLCHAIN_LIMITS = COMPILE_LIMITS._replace(address_space=8 << 30, cpu_s=600, file_size=1 << 30)
TOOLCHAIN_WALL_S = 900.0
MESSAGE_BYTES = 8192
ENV = ["PATH=/usr/bin:/bin", "LANG=C", "TMPDIR=/tmp"]
GUARD_SOURCE = os.path.join(os.path.dirname(__file__), "exec_guard.c")
REASON_WALL = 1  # csrc: supervise's Reason


class CompileError(Exception):
    """The solution does not compile; the message is the compiler's (tail)."""


def run_compiler(
    argv: Sequence[str], limits: Rlimits = COMPILE_LIMITS, wall_s: float = COMPILE_WALL_S
) -> dict:
    """Runs the compiler (argv[0] in /usr/bin) confined (see the module docstring) in its
    working directory; returns supervise()'s observation."""
    started = _executor.spawn(
        path=os.path.join(BIN, argv[0]),
        argv=list(argv),
        env=ENV,
        stdin=b"",
        rlimits=limits,
        allow_subprocesses=True,
        compile=True,
    )
    return supervise(
        started,
        wall_limit_s=wall_s,
        stdout_cap=1 << 20,
        stderr_cap=MESSAGE_BYTES,
        everything=True,
        who="the compiler",
    )


def _check(argv: Sequence[str]) -> bytes:
    """Runs a toolchain command on trusted input; its failure is the machine's, not a
    solution's."""
    obs = run_compiler(argv, TOOLCHAIN_LIMITS, TOOLCHAIN_WALL_S)
    if obs["code"] != 0 or obs["reason"] != 0:
        err = obs["stderr"].decode(errors="replace")
        raise RuntimeError(f"{' '.join(argv)} failed ({obs['code']}): {err}")
    return obs["stdout"]


def failure_message(obs: dict) -> str:
    """Why a compile failed, in the compiler's words where it has any."""
    text = obs["stderr"].decode(errors="replace")
    code = obs["code"]
    if obs["reason"] == REASON_WALL:
        why = f"compilation took longer than {COMPILE_WALL_S:g} s"
    elif code in (-signal.SIGXCPU, -signal.SIGKILL):
        why = f"compilation used more than {COMPILE_LIMITS.cpu_s} s of CPU"
    elif code == -signal.SIGXFSZ:
        why = f"the compiler's output exceeded {COMPILE_LIMITS.file_size >> 20} MB"
    elif code < 0:
        why = f"the compiler was killed by signal {-code}"
    else:
        why = "" if text else f"compiler exited with status {code}"
    return (text + ("\n" if text and why else "") + why + ("\n" if why else ""))[-MESSAGE_BYTES:]


def remove_contents(directory: str) -> None:
    """Empties `directory` without recursion (a tree a program built may be thousands of
    levels deep): an explicit stack of directories, emptied leaf first."""
    stack, found = [directory], []
    while stack:
        current = stack.pop()
        found.append(current)
        with os.scandir(current) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                else:
                    os.unlink(entry.path)
    for path in reversed(found[1:]):
        os.rmdir(path)


class Compiler:
    """Compiles solutions into `cache_dir`, shared by all workers (and runs) on the machine.

    `workdir` is the compiler's /tmp as the worker sees it; `toolchain` the mount point of the
    compiler's /toolchain, where the cache's toolchain directory is bound ("": no tree, the
    compiler sees the cache itself)."""

    def __init__(self, cache_dir: str, workdir: str, toolchain: str) -> None:
        import hashlib

        self.workdir = workdir
        self._sha256 = hashlib.sha256
        version = _check([CXX, "--version"])
        tag = self._sha256(version + " ".join(CXX_FLAGS + LINK_FLAGS).encode()).hexdigest()[:16]
        self.dir = os.path.join(cache_dir, f"cxx-{tag}")
        for sub in ("bin", "err", "locks", "pch/bits"):
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        self.guard = os.path.join(self.dir, "exec_guard.o")
        with self._lock("toolchain"):
            self._build_toolchain()
        self.view = self.dir
        if toolchain:
            _executor.bind(self.dir, toolchain, True)
            self.view = TOOLCHAIN

    def _lock(self, name: str) -> _FileLock:
        return _FileLock(os.path.join(self.dir, "locks", f"{name}.lock"))

    def _keep(self, name: str, into: str) -> None:
        """Moves the compiler's output `name` (in its /tmp) into the cache, atomically."""
        tmp = f"{into}.{os.getpid()}.tmp"
        shutil.copyfile(os.path.join(self.workdir, name), tmp)
        os.chmod(tmp, 0o644)
        os.rename(tmp, into)

    def _build_toolchain(self) -> None:
        try:
            if not os.path.exists(self.guard):
                shutil.copyfile(GUARD_SOURCE, os.path.join(self.workdir, "exec_guard.c"))
                _check(["gcc", "-O2", "-c", "exec_guard.c", "-o", "exec_guard.o"])
                self._keep("exec_guard.o", self.guard)
            pch = os.path.join(self.dir, "pch", "bits", "stdc++.h.gch")
            if not os.path.exists(pch):
                with open(os.path.join(self.workdir, "probe.cpp"), "w") as f:
                    f.write("#include <bits/stdc++.h>\n")
                deps = _check([CXX, *CXX_FLAGS, "-M", "probe.cpp"]).decode().split()
                header = next(d for d in deps if d.endswith("bits/stdc++.h"))
                _check([CXX, *CXX_FLAGS, "-x", "c++-header", header, "-o", "stdc++.h.gch"])
                self._keep("stdc++.h.gch", pch)
        finally:
            remove_contents(self.workdir)

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
        with open(os.path.join(self.workdir, "solution.cpp"), "w") as f:
            f.write(source)
        pch_dir = os.path.join(self.view, "pch")
        guard = os.path.join(self.view, "exec_guard.o")
        argv = [CXX, *CXX_FLAGS, "-I", pch_dir, guard, "solution.cpp", *LINK_FLAGS]
        try:
            obs = run_compiler([*argv, "-o", "solution"])
            built = os.path.join(self.workdir, "solution")
            if obs["code"] == 0 and obs["reason"] == 0 and os.path.isfile(built):
                self._keep("solution", cached)
                os.chmod(cached, 0o755)
                return
            tmp = f"{failed}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                f.write(failure_message(obs).replace(pch_dir + "/", ""))
            os.rename(tmp, failed)
        finally:
            remove_contents(self.workdir)


class _FileLock:
    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self) -> None:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)  # closing releases the lock
