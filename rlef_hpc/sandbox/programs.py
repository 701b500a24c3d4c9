"""The server's caches of runnable programs: compiled Python code objects in memory, C++
binaries compiled once into the shared cache and copied into the server's scratch (whence the
runner links the current job's binary into the tests' /solution)."""

from __future__ import annotations

import os
import shutil
import traceback
from collections import OrderedDict

from rlef_hpc import atomic
from rlef_hpc.sandbox import _executor, child
from rlef_hpc.sandbox.cpp import CompileError, Compiler
from rlef_hpc.sandbox.isolation import Sandbox

PYTHON_CACHED = 256  # distinct sources


class Programs:
    def __init__(self, sandbox: Sandbox, cache_bytes: int) -> None:
        self.sandbox = sandbox
        self.cache_bytes = cache_bytes  # the shared cache of compiled binaries, at most
        self.codes: OrderedDict[str, bytes] = OrderedDict()
        self.compiler: Compiler | None = None

    def python(self, source: str) -> bytes:
        """The compiled solution as the spare receives it; cached per distinct source."""
        if source in self.codes:
            self.codes.move_to_end(source)
            return self.codes[source]
        try:
            program = child.payload(source)
        except Exception as e:  # noqa: BLE001 - whatever compiling a source raises is its verdict
            # SyntaxError; ValueError (NUL bytes); and for sources nested a few thousand deep,
            # MemoryError or RecursionError from the parser's and compiler's own limits (the
            # worker's memory is not limited): never the sandbox's failure.
            raise CompileError("".join(traceback.format_exception_only(type(e), e))) from None
        self.codes[source] = program
        if len(self.codes) > PYTHON_CACHED:
            self.codes.popitem(last=False)
        return program

    def cpp(self, source: str) -> str:
        """The path of the solution's binary, compiled if no server has compiled it yet."""
        sandbox = self.sandbox
        _executor.drop_spare()  # compiling cleans up after the compiler as after a test
        if self.compiler is None:
            self.compiler = Compiler(sandbox, self.cache_bytes)
        local = os.path.join(sandbox.bindir, self.compiler.key(source))
        if os.path.exists(local):
            return local
        # Tests exec from the scratch tmpfs (the cache is outside their tree), and one copy per
        # solution costs far less than its compile.
        with self.compiler.binary(source) as cached:
            self._make_room(os.fstat(cached.fileno()).st_size)
            with atomic.replacing(local) as tmp:
                with open(tmp, "wb") as f:
                    shutil.copyfileobj(cached, f, 1 << 20)
                # Execute-only: a test may not read its binary, so exec makes it non-dumpable
                # (no core, no crash handler of the host's) before its first instruction.
                os.chmod(tmp, 0o111)
        return local

    def _make_room(self, size: int) -> None:
        """The oldest binaries out of the scratch until `size` more bytes fit in its budget: by
        bytes, not by count (a few large binaries used to fill it, and the next compile, then
        sharing the scratch, failed for want of space)."""
        bindir = self.sandbox.bindir
        entries = sorted(os.scandir(bindir), key=lambda e: e.stat().st_mtime_ns)
        total = sum(e.stat().st_size for e in entries)
        for entry in entries:
            if total + size <= self.sandbox.bin_bytes:
                break
            os.unlink(entry.path)
            total -= entry.stat().st_size
