"""Runs a request's tests, one at a time: starts each test's process, supervises it from
outside, measures it, and reports what it did."""

from __future__ import annotations

import os
from collections.abc import Callable

from rlef_hpc.sandbox import _executor, child
from rlef_hpc.sandbox.cpp import CompileError, remove_contents
from rlef_hpc.sandbox.isolation import Sandbox, SandboxSetupError, supervise
from rlef_hpc.sandbox.programs import Programs
from rlef_hpc.sandbox.protocol import RESULT, Report, RunRequest
from rlef_hpc.sandbox.rlimits import BASELINE, Rlimits, rlimits_for
from rlef_hpc.sandbox.types import Limits, Verdict
from rlef_hpc.sandbox.verdicts import verdict_of

STDERR_CAPTURE = 1 << 20
STDERR_KEPT = 4096
# A C++ test's argv and environment: nothing of the worker's.
NATIVE_ARGV = ["solution"]
NATIVE_ENV = ["PATH=/usr/bin:/bin", "LANG=C.UTF-8", "HOME=/tmp"]


_PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
_statm = -1  # opened once, after isolation made this process the server (reopening: 60 us)


def _memory_kb() -> tuple[int, int]:
    """(address space, private resident memory) of this process."""
    global _statm
    if _statm < 0:
        _statm = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
    size, resident, shared = map(int, os.pread(_statm, 256, 0).split()[:3])
    page_kb = _PAGE_KB
    return size * page_kb, (resident - shared) * page_kb


class Runner:
    def __init__(self, sandbox: Sandbox, programs: Programs) -> None:
        self.sandbox = sandbox
        self.programs = programs
        self.baseline_kb = 0
        self.template_vm_kb = 0

    def template_started(self) -> None:
        """Called right after the template was forked: its address space (what every Python
        test starts with) is this process's now, and a Python test's budget comes on top."""
        self.template_vm_kb = _memory_kb()[0]

    def measure_baseline(self) -> None:
        """Peak RSS of a Python test that does nothing: what the warm interpreter itself costs,
        subtracted from each Python test's peak so that `memory_kb` is the solution's own.
        Every Python test is a fork of the template, whose memory never changes: one
        measurement holds for good."""
        started = self._start(False, child.payload("pass"), b"", False, BASELINE)
        obs = supervise(
            started,
            wall_limit_s=10.0,
            stdout_cap=1 << 16,
            stderr_cap=STDERR_CAPTURE,
            everything=False,
            who="a test's process",
        )
        self.baseline_kb = obs["max_rss_kb"]

    def ensure_spare(self) -> None:
        """Has the template fork the next Python test's process ahead of its test (see csrc:
        prefork)."""
        try:
            _executor.prefork()
        except OSError as e:
            raise SandboxSetupError(f"no process for the next Python test: {e}") from None

    def _start(
        self, native: bool, program: bytes | str, stdin: bytes, allow_sub: bool, rlimits: Rlimits
    ) -> tuple[int, int, int, int]:
        """Starts a test's process: the spare (Python) or a vfork+exec of the binary (C++)."""
        if native:
            _executor.drop_spare()  # the test's cleanup must reach only the test's processes
            return _executor.spawn(
                path=self.sandbox.solution_exec,
                argv=NATIVE_ARGV,
                env=NATIVE_ENV,
                stdin=stdin,
                rlimits=rlimits,
                allow_subprocesses=allow_sub,
                compile=False,
            )
        while True:
            self.ensure_spare()
            started = _executor.dispatch(
                allow_subprocesses=allow_sub, stdin=stdin, payload=program, rlimits=rlimits
            )
            if started is not None:
                return started

    def run_job(
        self,
        req: RunRequest,
        send: Callable[[Report], None],
        stop_requested: Callable[[], bool],
    ) -> None:
        """Runs req["inputs"] in order, sending one result each.

        The server never sees expected outputs: every test's process is a copy of it, and a
        solution that could read them there (gc.get_objects(), its parent frames, stale heap)
        would be rewarded for it. The executor compares; it asks for a stop (stop_requested())
        when a stop-on-first-failure job gets a wrong answer."""
        native = req["language"] == "cpp"
        inputs = req["inputs"]
        try:
            source = req["source"]
            program = self.programs.cpp(source) if native else self.programs.python(source)
        except CompileError as e:
            for i in range(1 if req["stop_on_first_failure"] else len(inputs)):
                send(_not_run(req["first_index"] + i, Verdict.COMPILE_ERROR, str(e)[-4096:]))
            return
        limits = Limits(**req["limits"])
        rlimits = rlimits_for(limits, native=native, inherited_vm_bytes=self.template_vm_kb * 1024)
        if native:
            self._install(program)
        try:
            for i, stdin in enumerate(inputs):
                index = req["first_index"] + i
                started = self._start(native, program, stdin, req["allow_subprocesses"], rlimits)
                result = self._finish(native, started, limits, index, req["allow_subprocesses"])
                send(result)
                last = i + 1 == len(inputs)
                failed = result["verdict"] != Verdict.OK
                if req["stop_on_first_failure"] and (failed or stop_requested()):
                    return
                if not native and not last:
                    self.ensure_spare()  # for the last test, only after DONE (see server)
        finally:
            if native:  # the next job's tests (another solution's) must not find this binary
                self._install(None)

    def _install(self, binary: str | None) -> None:
        """Makes `binary` (in the server's cache) the tests' /solution/prog, or removes it."""
        prog = os.path.join(self.sandbox.solution_dir, "prog")
        if binary is None:
            if os.path.lexists(prog):
                os.unlink(prog)
            return
        new = prog + ".new"
        if os.path.lexists(new):
            os.unlink(new)
        os.link(binary, new)  # same tmpfs: instant
        os.rename(new, prog)

    def _finish(
        self,
        native: bool,
        started: tuple[int, int, int, int],
        limits: Limits,
        index: int,
        allow_sub: bool,
    ) -> Report:
        """Supervises one started test to its end; OK means it exited cleanly, the executor
        then compares its output."""
        obs = supervise(
            started,
            wall_limit_s=limits.wall_s,
            stdout_cap=limits.output_bytes,
            stderr_cap=STDERR_CAPTURE,
            everything=allow_sub,
            who="a test's process",
        )
        code, stderr = obs["code"], obs["stderr"]
        peak_kb = obs["max_rss_kb"]
        memory_kb = peak_kb if native else max(0, peak_kb - self.baseline_kb)
        verdict = verdict_of(obs, limits, memory_kb)
        self._clear_tmp()
        return Report(
            type=RESULT,
            index=index,
            verdict=verdict.value,
            time_s=obs["cpu_s"],
            wall_s=obs["wall_s"],
            memory_kb=memory_kb,
            exit_code=code,
            stdout=obs["stdout"],
            stderr=stderr[-STDERR_KEPT:].decode(errors="replace"),
        )

    def _clear_tmp(self) -> None:
        """Nothing a test writes may reach the next one: a /tmp that is not empty is replaced
        by a fresh tmpfs, whatever the test built in it (a walk of a tree the test built could
        be made to fail). A server that cannot must not serve on."""
        workdir = self.sandbox.workdir
        try:
            if not os.listdir(workdir):
                return
        except OSError:
            pass
        try:
            if self.sandbox.capabilities["minimal_root"]:
                _executor.unmount(workdir)
                _executor.mount_tmpfs(workdir, self.sandbox.tmp_options)
            else:
                remove_contents(workdir)
        except OSError as e:
            raise SandboxSetupError(f"cannot clear the tests' /tmp: {e}") from None


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
