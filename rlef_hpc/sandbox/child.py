"""What runs in a Python test's own process: a fork of the template, inside the sandbox.

The server prepares here, once, what every such fork inherits (the modules solutions import,
their stdio objects), then forks the template (csrc: start_template), which never sees a job:
`run_template` is its whole life, and `run_spare` that of each process it forks. The solution
can read its whole process, so nothing of another test may ever be in it: it is a copy of the
template, which holds nothing of any test.
"""

from __future__ import annotations

import builtins
import io
import linecache
import marshal
import os
import sys
import traceback
from typing import Any, NoReturn

from rlef_hpc.sandbox import _executor

SOLUTION_FILE = "solution.py"
# What solutions commonly import, loaded once in the server so that no test pays for it. Not
# threading: it registers fork handlers that every test's fork would then run.
PRELOAD = (
    "array bisect collections copy decimal fractions functools heapq io itertools linecache "
    "math operator random re statistics string typing"
).split()


def preload() -> None:
    for name in PRELOAD:
        __import__(name)


def payload(source: str) -> bytes:
    """The compiled solution as a spare receives it (see run_spare). Raises SyntaxError, or
    ValueError for NUL bytes in the source."""
    return marshal.dumps((compile(source, SOLUTION_FILE, "exec"), source))


_STDIO: tuple[Any, Any, Any] | None = None


def prepare_stdio() -> None:
    """Builds the test's sys.stdin/stdout/stderr once, in the server, rather than in every
    test's process (where they cost a quarter of a millisecond). They are created over
    descriptors of the kinds a test gets (a memfd, pipes) so that what they cache about them
    holds there."""
    global _STDIO
    saved = [os.dup(fd) for fd in (0, 1, 2)]
    memfd = os.memfd_create("stdin")
    r, w = os.pipe()
    os.dup2(memfd, 0)
    os.dup2(w, 1)
    os.dup2(w, 2)
    stdin = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)))
    stdout = io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, "w", closefd=False), 1 << 16))
    stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True)
    for stream in (stdin, stdout, stderr):
        stream.buffer.seekable()
    for fd, old in zip((0, 1, 2), saved, strict=True):
        os.dup2(old, fd)
        os.close(old)
    for fd in (memfd, r, w):
        os.close(fd)
    _STDIO = (stdin, stdout, stderr)


def run_template() -> NoReturn:
    """The template: forks a spare whenever the server asks; only the spares return from
    template_loop, each to wait for its test."""
    _executor.template_loop()
    run_spare()


def run_spare() -> NoReturn:
    """The spare (see csrc: prefork): waits for its test, which enters the sandbox with that
    test's limits and policy, then runs the solution. Never returns."""
    code, source = marshal.loads(_executor.await_go())
    run_solution(code, source)


# csrc/executor.cc (kOutOfMemory) prints the same when an allocation at the limit fails.
_OUT_OF_MEMORY = b"Traceback (most recent call last):\n  (omitted: out of memory)\nMemoryError\n"


def run_solution(code: Any, source: str) -> NoReturn:
    """Runs the solution as __main__ and exits with its status; a traceback on stderr names
    only the solution's own frames."""
    status = 0
    try:
        sys.stdin, sys.stdout, sys.stderr = _STDIO  # type: ignore[misc]
        sys.argv = [SOLUTION_FILE]
        exec(code, {"__name__": "__main__", "__builtins__": builtins})
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            status = (e.code or 0) & 0xFF
        else:
            status = 1
            _write_stderr(f"{e.code}\n".encode())
    except MemoryError:
        # The traceback still holds the frames that filled memory; formatting it could fail.
        status = 1
        os.write(2, _OUT_OF_MEMORY)
    except BaseException as e:  # noqa: BLE001 - everything the solution raises is its verdict
        status = 1
        linecache.cache[SOLUTION_FILE] = (len(source), None, source.splitlines(True), SOLUTION_FILE)
        tb = e.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != SOLUTION_FILE:
            tb = tb.tb_next  # drop the sandbox's own frames
        _write_stderr("".join(traceback.format_exception(type(e), e, tb)).encode())
    try:
        sys.stdout.flush()
    except BaseException:  # noqa: BLE001 - stdout closed by the solution: its output is what it is
        pass
    os._exit(status)


def _write_stderr(data: bytes) -> None:
    try:
        os.write(2, data)
    except OSError:
        pass
