"""Runs a request's tests, one at a time: starts each test's process, supervises it from
outside, measures it, and reports what it did."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable

from rlef_hpc.sandbox import _executor, child
from rlef_hpc.sandbox.cpp import CompileError
from rlef_hpc.sandbox.isolation import Sandbox
from rlef_hpc.sandbox.programs import Programs
from rlef_hpc.sandbox.protocol import RESULT, Report, RunRequest
from rlef_hpc.sandbox.rlimits import BASELINE, Rlimits, rlimits_for
from rlef_hpc.sandbox.types import Limits, Verdict
from rlef_hpc.sandbox.verdicts import verdict_of

# Exit status and stderr marker of a test's process whose sandbox set-up failed (csrc:
# setup_failed): the sandbox, not the solution, is at fault.
SETUP_FAILED_STATUS, SETUP_FAILED = 120, b"rlef-sandbox-setup-failed"
STDERR_CAPTURE = 1 << 20
STDERR_KEPT = 4096


class SandboxSetupError(RuntimeError):
    """The sandbox, not the solution, failed: the test was not run."""


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
        self.baseline_private_kb = 0
        self.python_baseline_kb = 0

    def measure_baseline(self) -> None:
        """Peak RSS of a Python test that does nothing: what the warm interpreter itself costs,
        subtracted from each Python test's peak so that `memory_kb` is the solution's own. A
        fork starts with the server's private pages counted, so their growth since this
        measurement is subtracted too (see run_job). Call once the interpreter is warm."""
        pid, out_fd, err_fd = self._start(False, child.payload("pass"), b"", False, BASELINE)
        obs = _executor.supervise(
            pid=pid,
            stdout_fd=out_fd,
            stderr_fd=err_fd,
            wall_limit_s=10.0,
            stdout_cap=1 << 16,
            stderr_cap=1 << 16,
        )
        self.baseline_kb = obs["max_rss_kb"]
        self.baseline_private_kb = _memory_kb()[1]

    def ensure_spare(self) -> None:
        """Forks the next Python test's process ahead of its test (see csrc: prefork)."""
        if _executor.prefork() == 0:
            self.programs.forget()
            child.run_spare()

    def _start(
        self, native: bool, program: bytes | str, stdin: bytes, allow_sub: bool, rlimits: Rlimits
    ) -> tuple[int, int, int]:
        """Starts a test's process: the spare (Python) or a vfork+exec of the binary (C++)."""
        s = self.sandbox
        ids = {"safe": s.safe, "drop_uid": s.drop_uid, "uid": s.uid, "gid": s.gid}
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
        vm_kb, private_kb = _memory_kb()
        self.python_baseline_kb = self.baseline_kb + private_kb - self.baseline_private_kb
        rlimits = rlimits_for(limits, native=native, inherited_vm_bytes=vm_kb * 1024)
        for i, stdin in enumerate(inputs):
            index = req["first_index"] + i
            started = self._start(native, program, stdin, req["allow_subprocesses"], rlimits)
            result = self._finish(native, started, limits, index)
            send(result)
            last = i + 1 == len(inputs)
            failed = result["verdict"] != Verdict.OK
            if req["stop_on_first_failure"] and (failed or stop_requested()):
                return
            if not native and not last:
                self.ensure_spare()  # for the last test, only after DONE (see server)

    def _finish(
        self, native: bool, started: tuple[int, int, int], limits: Limits, index: int
    ) -> Report:
        """Supervises one started test to its end; OK means it exited cleanly, the executor
        then compares its output."""
        pid, out_fd, err_fd = started
        obs = _executor.supervise(
            pid=pid,
            stdout_fd=out_fd,
            stderr_fd=err_fd,
            wall_limit_s=limits.wall_s,
            stdout_cap=limits.output_bytes,
            stderr_cap=STDERR_CAPTURE,
        )
        code, stderr = obs["code"], obs["stderr"]
        if code == SETUP_FAILED_STATUS and SETUP_FAILED in stderr:
            raise SandboxSetupError(stderr.decode(errors="replace"))
        peak_kb = obs["max_rss_kb"]
        memory_kb = peak_kb if native else max(0, peak_kb - self.python_baseline_kb)
        verdict = verdict_of(obs, limits, memory_kb)
        workdir = self.sandbox.workdir
        if os.listdir(workdir):  # nothing a test writes may reach the next one
            _clear(workdir)
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


def _clear(directory: str) -> None:
    for entry in os.scandir(directory):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            os.unlink(entry.path)
