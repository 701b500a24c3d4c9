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

import contextlib
import fcntl
import os
import shutil
import signal
from collections.abc import Sequence
from typing import BinaryIO

from rlef_hpc import atomic
from rlef_hpc.sandbox import _executor
from rlef_hpc.sandbox.isolation import TOOLCHAIN, Sandbox, supervise
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
# Room in the compiler's /tmp beyond its outputs (the compiler's temporaries), and all it keeps
# between compiles.
SCRATCH_SLACK = 8 << 20
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


class Compiler:
    """Compiles solutions into the cache (`sandbox.cache_dir`), shared by all workers (and runs)
    on the machine: `cxx-TAG/bin` and `err` keep each distinct source's binary or compile error,
    by the source's hash, up to `max_bytes` in all (the oldest go first); `toolchain` holds the
    precompiled header and the exec guard, the one directory the compiler sees of the cache
    (its /toolchain, bound read-only; without a tree it is the cache's own path)."""

    def __init__(self, sandbox: Sandbox, max_bytes: int) -> None:
        import hashlib

        self.sandbox = sandbox
        self.workdir = sandbox.compiledir
        self.max_bytes = max_bytes
        self._written = 0  # bytes this worker added to the cache since it last trimmed it
        self._sha256 = hashlib.sha256
        sandbox.fresh_compiledir(SCRATCH_SLACK)
        version = _check([CXX, "--version"])
        with open(GUARD_SOURCE, "rb") as f:  # every binary links it: a new guard, a new cache
            guard = f.read()
        digest = self._sha256(version + " ".join(CXX_FLAGS + LINK_FLAGS).encode() + guard)
        self.dir = os.path.join(sandbox.cache_dir, f"cxx-{digest.hexdigest()[:16]}")
        for sub in ("bin", "err", "locks", "toolchain/pch/bits"):
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        self.toolchain = os.path.join(self.dir, "toolchain")
        with self._lock("toolchain"):
            self._build_toolchain()
        self._trim()  # a cache a run with a larger budget left
        self.view = self.toolchain
        if sandbox.toolchain:
            _executor.bind(self.toolchain, sandbox.toolchain, True)
            self.view = TOOLCHAIN

    def _lock(self, name: str) -> _FileLock:
        return _FileLock(os.path.join(self.dir, "locks", f"{name}.lock"))

    def _keep(self, name: str, into: str) -> None:
        """Moves the compiler's output `name` (in its /tmp) into the cache, atomically; never
        through a link the compiler's /tmp might hold."""
        fd = os.open(os.path.join(self.workdir, name), os.O_RDONLY | os.O_NOFOLLOW)
        with open(fd, "rb") as src, atomic.replacing(into) as tmp, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
            os.chmod(tmp, 0o644)

    def _build_toolchain(self) -> None:
        guard = os.path.join(self.toolchain, "exec_guard.o")
        pch = os.path.join(self.toolchain, "pch", "bits", "stdc++.h.gch")
        if os.path.exists(guard) and os.path.exists(pch):
            return
        # Trusted input, and the header's output is large: room for the toolchain's file limit.
        self.sandbox.fresh_compiledir(2 * TOOLCHAIN_LIMITS.file_size)
        try:
            if not os.path.exists(guard):
                shutil.copyfile(GUARD_SOURCE, os.path.join(self.workdir, "exec_guard.c"))
                _check(["gcc", "-O2", "-c", "exec_guard.c", "-o", "exec_guard.o"])
                self._keep("exec_guard.o", guard)
            if not os.path.exists(pch):
                with open(os.path.join(self.workdir, "probe.cpp"), "w") as f:
                    f.write("#include <bits/stdc++.h>\n")
                deps = _check([CXX, *CXX_FLAGS, "-M", "probe.cpp"]).decode().split()
                header = next(d for d in deps if d.endswith("bits/stdc++.h"))
                _check([CXX, *CXX_FLAGS, "-x", "c++-header", header, "-o", "stdc++.h.gch"])
                self._keep("stdc++.h.gch", pch)
        finally:
            self.sandbox.fresh_compiledir(SCRATCH_SLACK)

    def key(self, source: str) -> str:
        """The cache's name for `source`'s binary (a lone surrogate is a byte sequence like any
        other: g++ rejects it, never the worker)."""
        return self._sha256(source.encode("utf-8", "surrogatepass")).hexdigest()

    def binary(self, source: str) -> BinaryIO:
        """The compiled binary for `source`, opened (an open file stays readable if the cache
        drops it meanwhile); raises CompileError."""
        key = self.key(source)
        cached = os.path.join(self.dir, "bin", key)
        failed = os.path.join(self.dir, "err", key)
        for _ in range(2):  # another worker may trim the cache between two steps here
            if not os.path.exists(cached) and not os.path.exists(failed):
                # Two workers given the same source compile it once. One lock file per 4,096th
                # of the keys, not per key: per key, they would pile up without bound.
                with self._lock(key[:3]):
                    if not os.path.exists(cached) and not os.path.exists(failed):
                        self._written += self._compile(source, cached, failed)
                        if self._written >= self.max_bytes // 10:
                            self._trim()
            with contextlib.suppress(FileNotFoundError):
                return open(cached, "rb")  # noqa: SIM115 - the caller closes it
            with contextlib.suppress(FileNotFoundError), open(failed, "rb") as f:
                raise CompileError(f.read().decode(errors="replace"))
        raise RuntimeError(f"the compile cache dropped {key} twice while it was read")

    def _compile(self, source: str, cached: str, failed: str) -> int:
        """Compiles into the cache; returns the bytes of disk it added there."""
        text = source.encode("utf-8", "surrogatepass")
        # The compiler's /tmp holds this compile only: the source, the object and the binary
        # (each at most the file-size limit), and the compiler's few temporaries.
        self.sandbox.fresh_compiledir(len(text) + 2 * COMPILE_LIMITS.file_size + SCRATCH_SLACK)
        with open(os.path.join(self.workdir, "solution.cpp"), "wb") as f:
            f.write(text)
        pch_dir = os.path.join(self.view, "pch")
        guard = os.path.join(self.view, "exec_guard.o")
        argv = [CXX, *CXX_FLAGS, "-I", pch_dir, guard, "solution.cpp", *LINK_FLAGS]
        try:
            obs = run_compiler([*argv, "-o", "solution"])
            built = os.path.join(self.workdir, "solution")
            if obs["code"] == 0 and obs["reason"] == 0 and os.path.isfile(built):
                self._keep("solution", cached)
                os.chmod(cached, 0o755)
                return os.stat(cached).st_blocks * 512
            atomic.write_text(failed, failure_message(obs).replace(pch_dir + "/", ""))
            return os.stat(failed).st_blocks * 512
        finally:
            self.sandbox.fresh_compiledir(SCRATCH_SLACK)

    def _trim(self) -> None:
        """Keeps the cache's binaries and compile errors under `max_bytes` of disk (blocks: a
        short compile error takes one), the oldest out first, down to 90 %: every distinct
        source adds one, up to the compile's file-size limit, and a run's samples (or a policy
        that learned to make large binaries) would fill the host's disk. A worker trims when it
        starts and whenever it has added a tenth of the budget since its last trim: a scan per
        compile would cost a second at the cache's fullest (a million short compile errors),
        and the cache goes over by at most a tenth per worker in between."""
        self._written = 0
        with self._lock("trim"):
            entries = []
            for sub in ("bin", "err"):
                with os.scandir(os.path.join(self.dir, sub)) as found:
                    for entry in found:
                        if entry.name.startswith(atomic.PREFIX):  # another worker's, being written
                            continue
                        with contextlib.suppress(FileNotFoundError):
                            st = entry.stat(follow_symlinks=False)
                            entries.append((st.st_mtime_ns, st.st_blocks * 512, entry.path))
            total = sum(size for _, size, _ in entries)
            if total <= self.max_bytes:
                return
            for _, size, path in sorted(entries):
                if total <= self.max_bytes * 9 // 10:
                    break
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                total -= size


class _FileLock:
    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self) -> None:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)  # closing releases the lock
