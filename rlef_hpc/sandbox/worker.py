"""A sandbox worker: a long-lived server that runs untrusted tests one at a time.

Started by `Executor` as `python -I -m rlef_hpc.sandbox.worker CONFIG` from a clean environment
(never forked from the trainer). It isolates itself once (see csrc/executor.cc), pre-imports the
stdlib modules solutions use, and then serves jobs over a pipe: per test a fork of this warm
interpreter (Python) or a vfork+exec of a cached binary (C++), supervised from outside.
"""

from __future__ import annotations

import builtins
import gc
import io
import json
import linecache
import marshal
import os
import select
import shutil
import signal
import sys
import traceback
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from rlef_hpc.sandbox import _executor
from rlef_hpc.sandbox.cpp import CompileError, Compiler
from rlef_hpc.sandbox.protocol import (
    DONE,
    ERROR,
    EXIT,
    FATAL,
    HELLO,
    RESULT,
    RUN,
    STOP,
    TO_SERVER,
    Capabilities,
    Done,
    Failure,
    Hello,
    ProtocolError,
    Report,
    RunRequest,
    ServerConfig,
    read_message,
    write_frame,
)
from rlef_hpc.sandbox.rlimits import BASELINE, Rlimits, rlimits_for
from rlef_hpc.sandbox.types import Limits, Verdict

SOLUTION_FILE = "solution.py"
SETUP_FAILED = b"rlef-sandbox-setup-failed"
REASON_WALL, REASON_OUTPUT = 1, 2
STDERR_CAPTURE = 1 << 20
# What solutions commonly import, loaded once here so that no test pays for it. Not threading:
# it registers fork handlers that every test's fork would then run.
PRELOAD = (
    "array bisect collections copy decimal fractions functools heapq io itertools linecache "
    "math operator random re statistics string typing"
).split()


class SandboxSetupError(RuntimeError):
    """The sandbox, not the solution, failed: the test was not run."""


_PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
_statm = -1  # opened once, after isolation made this process the worker (reopening: 60 us)


def _memory_kb() -> tuple[int, int]:
    """(address space, private resident memory) of this process."""
    global _statm
    if _statm < 0:
        _statm = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
    size, resident, shared = map(int, os.pread(_statm, 256, 0).split()[:3])
    page_kb = _PAGE_KB
    return size * page_kb, (resident - shared) * page_kb


class Worker:
    def __init__(self, config: ServerConfig) -> None:
        self.scratch = config["scratch"]
        self.cache_dir = config["cache_dir"]
        self.uid = config["uid"]
        self.gid = config["gid"]
        self.capabilities = Capabilities(
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
                achieved = _executor.isolate(self.scratch, [self.cache_dir], config["scratch_mb"])
                self.capabilities.update(achieved)  # type: ignore[typeddict-item]
            except OSError as e:
                self.capabilities["isolation_error"] = str(e)
        if config["seccomp"] and _executor.seccomp_available():
            _executor.build_policies()
            self.capabilities["seccomp"] = True
        # Dropping to a per-worker uid needs real root: in a user namespace only one uid exists.
        self.drop_uid = os.geteuid() == 0 and not self.capabilities["user_ns"]
        self.capabilities["uid_drop"] = self.drop_uid
        self.safe = self.capabilities["seccomp"]
        self.workdir = os.path.join(self.scratch, "work")
        self.bindir = os.path.join(self.scratch, "bin")
        self.compiledir = os.path.join(self.scratch, "compile")
        for d in (self.workdir, self.bindir, self.compiledir):
            os.makedirs(d, exist_ok=True)
            if self.drop_uid and d != self.bindir:
                os.chown(d, self.uid, self.gid)
        self.compile_landlock = _executor.landlock_ruleset(self.compiledir)
        test_landlock = _executor.landlock_ruleset(self.workdir)
        _executor.set_test_landlock(test_landlock)
        self.capabilities["landlock"] = test_landlock >= 0
        if self.drop_uid and self.capabilities["mount_ns"]:
            self._expose_python_path()
        os.chdir(self.workdir)
        os.environ.clear()
        os.environ.update({"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": self.workdir})
        for name in PRELOAD:
            __import__(name)
        self.codes: OrderedDict[str, bytes] = OrderedDict()
        self.compiler: Compiler | None = None
        _prepare_stdio()
        gc.freeze()  # a collection in a test's process would touch (and copy) every page
        self.baseline_kb = self._python_baseline_kb()
        self.baseline_private_kb = _memory_kb()[1]

    def _python_baseline_kb(self) -> int:
        """Peak RSS of a Python test that does nothing: what the warm interpreter itself costs,
        subtracted from each Python test's peak so that `memory_kb` is the solution's own. A
        fork starts with the worker's private pages counted, so their growth since this
        measurement is subtracted too (see run_job)."""
        empty = _python_payload("pass")
        pid, out_fd, err_fd = self._start(False, empty, b"", False, BASELINE)
        obs = _executor.supervise(
            pid=pid,
            stdout_fd=out_fd,
            stderr_fd=err_fd,
            wall_limit_s=10.0,
            stdout_cap=1 << 16,
            stderr_cap=1 << 16,
        )
        return obs["max_rss_kb"]

    def _start(
        self, native: bool, program: Any, stdin: bytes, allow_sub: bool, rlimits: Rlimits
    ) -> tuple[int, int, int]:
        """Starts a test's process: the spare (Python) or a vfork+exec of the binary (C++)."""
        ids = {"safe": self.safe, "drop_uid": self.drop_uid, "uid": self.uid, "gid": self.gid}
        if native:
            _executor.drop_spare()  # the test's cleanup must reach only the test's processes
            return _executor.spawn(
                native=True,
                allow_subprocesses=allow_sub,
                stdin=stdin,
                exec_path=program,
                rlimits=rlimits,
                **ids,
            )
        while True:
            self.ensure_spare()
            started = _executor.dispatch(
                allow_subprocesses=allow_sub, stdin=stdin, payload=program, rlimits=rlimits, **ids
            )
            if started is not None:
                return started

    def ensure_spare(self) -> None:
        """Forks the next Python test's process ahead of its test (see csrc: prefork)."""
        if _executor.prefork() == 0:
            # The spare: wait for a test, then run it inside the sandbox. Never returns. Other
            # solutions' code stays out of its reach (one might have passed these tests).
            self.codes.clear()
            code, source = marshal.loads(_executor.await_go())
            _run_python_child(code, source)

    def _expose_python_path(self) -> None:
        """Makes the interpreter's library directories importable by the sandbox uid.

        Python often lives under a home directory the uid cannot enter (pyenv in /root, conda
        in ~). Each such sys.path entry is bound, read-only, under the scratch directory and
        sys.path points there instead, so `import ctypes` in a test finds it."""
        import importlib

        moved = {}
        for i, entry in enumerate(sys.path):
            if not os.path.isdir(entry) or _world_reachable(entry):
                continue
            view = os.path.join(self.scratch, "pylib", str(i))
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

    # --- programs ------------------------------------------------------------------------------

    def python_program(self, source: str) -> bytes:
        """The compiled solution as the spare receives it; cached per distinct source."""
        if source in self.codes:
            self.codes.move_to_end(source)
            return self.codes[source]
        try:
            payload = _python_payload(source)
        except (SyntaxError, ValueError) as e:  # ValueError: NUL bytes in the source
            raise CompileError("".join(traceback.format_exception_only(type(e), e))) from None
        self.codes[source] = payload
        if len(self.codes) > 256:
            self.codes.popitem(last=False)
        return payload

    def cpp_program(self, source: str) -> str:
        _executor.drop_spare()  # compiling cleans up after the compiler as after a test
        if self.compiler is None:
            view = (
                os.path.join(self.scratch, "toolchain") if self.capabilities["mount_ns"] else None
            )
            uid = self.uid if self.drop_uid else None
            landlock = self.compile_landlock
            self.compiler = Compiler(self.cache_dir, self.compiledir, uid, view, landlock)
        cached = self.compiler.binary(source)
        local = os.path.join(self.bindir, os.path.basename(cached))
        if not os.path.exists(local):
            # Tests exec from the scratch tmpfs: the cache may not be reachable by the sandbox
            # uid, and one copy per solution costs far less than its compile.
            for old in sorted(os.scandir(self.bindir), key=lambda e: e.stat().st_mtime)[:-16]:
                os.unlink(old.path)
            shutil.copyfile(cached, local + ".tmp")
            os.chmod(local + ".tmp", 0o555)
            os.rename(local + ".tmp", local)
        return local

    # --- tests ---------------------------------------------------------------------------------

    def run_job(
        self,
        req: RunRequest,
        send: Callable[[Report], None],
        stop_requested: Callable[[], bool],
    ) -> None:
        """Runs req["inputs"] in order, sending one result each.

        The worker never sees expected outputs: every test's process is a copy of this one, and
        a solution that could read them here (gc.get_objects(), its parent frames, stale heap)
        would be rewarded for it. The executor compares; it asks for a stop (stop_requested())
        when a stop-on-first-failure job gets a wrong answer."""
        native = req["language"] == "cpp"
        inputs = req["inputs"]
        try:
            program = (
                self.cpp_program(req["source"]) if native else self.python_program(req["source"])
            )
        except CompileError as e:
            for i in range(1 if req["stop_on_first_failure"] else len(inputs)):
                send(_not_run(req["first_index"] + i, Verdict.COMPILE_ERROR, str(e)[-4096:]))
            return
        limits = Limits(**req["limits"])
        vm_kb, private_kb = _memory_kb()
        self.python_baseline_kb = self.baseline_kb + private_kb - self.baseline_private_kb
        rlimits = rlimits_for(limits, native=native, inherited_vm_bytes=vm_kb * 1024)
        for i, stdin in enumerate(inputs):
            index = req["first_index"] + i
            result = self.run_test(native, program, req, limits, stdin, rlimits, index)
            send(result)
            last = i + 1 == len(inputs)
            failed = result["verdict"] != Verdict.OK
            if req["stop_on_first_failure"] and (failed or stop_requested()):
                return
            if not native and not last:
                self.ensure_spare()  # for the last test, only after "done" (see main)

    def run_test(
        self,
        native: bool,
        program: Any,
        req: RunRequest,
        limits: Limits,
        stdin: bytes,
        rlimits: Rlimits,
        index: int,
    ) -> Report:
        """One test; "OK" means it exited cleanly, the executor then compares its output."""
        pid, out_fd, err_fd = self._start(
            native, program, stdin, req["allow_subprocesses"], rlimits
        )
        obs = _executor.supervise(
            pid=pid,
            stdout_fd=out_fd,
            stderr_fd=err_fd,
            wall_limit_s=limits.wall_s,
            stdout_cap=limits.output_bytes,
            stderr_cap=STDERR_CAPTURE,
        )
        code, stdout, stderr = obs["code"], obs["stdout"], obs["stderr"]
        if code == 120 and SETUP_FAILED in stderr:
            raise SandboxSetupError(stderr.decode(errors="replace"))
        memory_kb = (
            obs["max_rss_kb"] if native else max(0, obs["max_rss_kb"] - self.python_baseline_kb)
        )
        if obs["reason"] == REASON_OUTPUT:
            verdict = Verdict.OUTPUT_LIMIT
        elif code == -signal.SIGSYS:
            verdict = Verdict.SANDBOX_VIOLATION
        elif (
            obs["reason"] == REASON_WALL or obs["cpu_s"] > limits.time_s or code == -signal.SIGXCPU
        ):
            verdict = Verdict.TIME_LIMIT
        elif code != 0:
            out_of_memory = b"MemoryError" in stderr[-512:] or b"std::bad_alloc" in stderr[-512:]
            out_of_memory |= memory_kb >= 0.98 * (limits.memory_mb << 10)
            verdict = Verdict.MEMORY_LIMIT if out_of_memory else Verdict.RUNTIME_ERROR
        else:
            verdict = Verdict.OK
        if os.listdir(self.workdir):  # nothing a test writes may reach the next one
            _clear(self.workdir)
        return Report(
            type=RESULT,
            index=index,
            verdict=verdict.value,
            time_s=obs["cpu_s"],
            wall_s=obs["wall_s"],
            memory_kb=memory_kb,
            exit_code=code,
            stdout=stdout,
            stderr=stderr[-4096:].decode(errors="replace"),
        )


def _not_run(index: int, verdict: Verdict, stderr: str) -> Report:
    return Report(
        type=RESULT,
        index=index,
        verdict=verdict.value,
        time_s=0.0,
        wall_s=0.0,
        memory_kb=0,
        exit_code=0,
        stdout=b"",
        stderr=stderr,
    )


def _python_payload(source: str) -> bytes:
    return marshal.dumps((compile(source, SOLUTION_FILE, "exec"), source))


def _world_reachable(path: str) -> bool:
    """Whether a uid that is neither owner nor group can list `path` (and so import from it)."""
    import stat

    path = os.path.abspath(path)
    if os.stat(path).st_mode & (stat.S_IROTH | stat.S_IXOTH) != (stat.S_IROTH | stat.S_IXOTH):
        return False
    while path != "/":
        path = os.path.dirname(path)
        if not os.stat(path).st_mode & stat.S_IXOTH:
            return False
    return True


def _clear(directory: str) -> None:
    for entry in os.scandir(directory):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            os.unlink(entry.path)


_STDIO: tuple[Any, Any, Any] | None = None


def _prepare_stdio() -> None:
    """Builds the test's sys.stdin/stdout/stderr once, here, rather than in every test's
    process (where they cost a quarter of a millisecond). They are created over descriptors of
    the kinds a test gets (a memfd, pipes) so that what they cache about them holds there."""
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


_OUT_OF_MEMORY = b"Traceback (most recent call last):\n  (omitted: out of memory)\nMemoryError\n"


def _run_python_child(code: Any, source: str) -> None:
    """The test's process, already inside the sandbox: run the solution as __main__."""
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


def main() -> None:
    config = json.loads(sys.argv[1])
    # The executor's channel moves off stdin/stdout so that nothing printed by accident (or by
    # a test, whose stdio are its own pipes) can corrupt it.
    rfd, wfd = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    # The executor owns this process's life (end of the channel ends it): the SIGTERM/SIGUSR1/
    # SIGUSR2 that Slurm sends to every process of a job step must not take it away from a
    # trainer that is finishing its iteration before it checkpoints.
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    worker = Worker(config)
    write_frame(wfd, Hello(type=HELLO, capabilities=worker.capabilities))
    worker.ensure_spare()
    job = None

    def stop_requested() -> bool:
        while select.select([rfd], [], [], 0)[0]:
            message = read_message(rfd, TO_SERVER)
            if message is None or message["type"] == EXIT:
                sys.exit(0)
            if message["type"] == STOP and message["job"] == job:
                return True
        return False

    while True:
        try:
            req = read_message(rfd, TO_SERVER)
        except ProtocolError:
            write_frame(wfd, Failure(type=ERROR, message=traceback.format_exc()))
            continue
        if req is None or req["type"] == EXIT:
            return
        if req["type"] != RUN:
            continue  # a stop for a job that already finished
        job = req["job"]
        try:
            worker.run_job(req, lambda r: write_frame(wfd, r), stop_requested)
            write_frame(wfd, Done(type=DONE))
            if req["language"] == "python":  # the next job is likely Python too: be ready
                worker.ensure_spare()
        except SandboxSetupError as e:
            write_frame(wfd, Failure(type=FATAL, message=str(e)))
            raise
        except Exception:  # noqa: BLE001 - the job fails, the worker keeps serving
            write_frame(wfd, Failure(type=ERROR, message=traceback.format_exc()))


if __name__ == "__main__":
    main()
