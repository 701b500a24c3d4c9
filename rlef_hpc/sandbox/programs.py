"""The server's caches of runnable programs: compiled Python code objects in memory, C++
binaries compiled once into the shared cache and copied into the server's scratch (whence the
runner links the current job's binary into the tests' /solution)."""

from __future__ import annotations

import os
import shutil
import traceback
from collections import OrderedDict

from rlef_hpc.sandbox import _executor, child
from rlef_hpc.sandbox.cpp import CompileError, Compiler
from rlef_hpc.sandbox.isolation import Sandbox

PYTHON_CACHED = 256  # distinct sources
BINARIES_KEPT = 16  # in the scratch tmpfs


class Programs:
    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.codes: OrderedDict[str, bytes] = OrderedDict()
        self.compiler: Compiler | None = None

    def python(self, source: str) -> bytes:
        """The compiled solution as the spare receives it; cached per distinct source."""
        if source in self.codes:
            self.codes.move_to_end(source)
            return self.codes[source]
        try:
            program = child.payload(source)
        except (SyntaxError, ValueError) as e:  # ValueError: NUL bytes in the source
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
            self.compiler = Compiler(sandbox.cache_dir, sandbox.compiledir, sandbox.toolchain)
        cached = self.compiler.binary(source)
        local = os.path.join(sandbox.bindir, os.path.basename(cached))
        if not os.path.exists(local):
            # Tests exec from the scratch tmpfs (the cache is outside their tree), and one copy
            # per solution costs far less than its compile.
            old = sorted(os.scandir(sandbox.bindir), key=lambda e: e.stat().st_mtime)
            for entry in old[:-BINARIES_KEPT]:
                os.unlink(entry.path)
            shutil.copyfile(cached, local + ".tmp")
            os.chmod(local + ".tmp", 0o555)
            os.rename(local + ".tmp", local)
        return local
