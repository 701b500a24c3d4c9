"""Hostile programs: each must end with the right verdict within its limit + 1 s, leave no
process behind, change no file outside its scratch directory, and leave the executor serving."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from rlef_hpc.sandbox import Executor, Limits, TestCase, Verdict

HOSTILE = Path(__file__).parent / "hostile"
PROGRAMS = sorted(p for p in HOSTILE.iterdir() if p.suffix in (".py", ".cpp"))
TARGET = Path("/tmp/rlef_hostile_target")
SENTINELS = [Path("/tmp/rlef_hostile_sentinel"), Path("/tmp/rlef_hostile_sentinel_dir")]
LIMITS = Limits(time_s=1.0, memory_mb=256, output_bytes=1 << 20)
A_PLUS_B = "a, b = map(int, input().split())\nprint(a + b)\n"


def header(path: Path) -> dict[str, str]:
    """`# key: value` (or `// key: value`) lines at the top of a program."""
    fields = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^(?:#|//) ([a-z-]+): (.*)$", line)
        if m:
            fields[m[1]] = m[2]
    return fields


def sandbox_processes(uids: list[int]) -> list[str]:
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue
        uid = int(re.search(r"^Uid:\s+(\d+)", text, re.M)[1])
        if uid in uids:
            found.append(f"{status.parent.name}: {text.splitlines()[0]}")
    return found


@pytest.fixture
def guarded_files():
    for s in SENTINELS:
        assert not s.exists(), f"{s} left over from an earlier run; remove it"
    TARGET.write_text("original")
    TARGET.chmod(0o666)  # even a world-writable file must stay untouched
    yield
    assert TARGET.read_text() == "original", "a test modified a file outside its scratch dir"
    TARGET.unlink()
    for s in SENTINELS:
        assert not s.exists(), f"a test created {s} outside its scratch dir"


def check_hostile(executor: Executor, path: Path, limits: Limits = LIMITS) -> None:
    meta = header(path)
    language = "python" if path.suffix == ".py" else "cpp"
    stdin = "7" * (int(meta["stdin-mb"]) << 20) if "stdin-mb" in meta else "1 2\n"
    if "output-hex" in meta:
        meta["output"] = bytes.fromhex(meta["output-hex"]).decode()
    test = TestCase(stdin, meta["output"] + "\n" if "output" in meta else None)
    if language == "cpp":  # compile outside the timed run
        executor.run("cpp", path.read_text(), [TestCase("", None)], Limits(time_s=0.01))
    start = time.monotonic()
    [result] = executor.run(language, path.read_text(), [test], limits)
    elapsed = time.monotonic() - start
    assert result.verdict == Verdict(meta["expect"]), (result.stderr, result.output[:200])
    assert result.wall_s <= limits.time_s + 1.0
    assert elapsed <= limits.time_s + 1.0
    assert sandbox_processes(executor.uids) == []
    assert executor.leftover_processes() == []
    [check] = executor.run("python", A_PLUS_B, [TestCase("2 3\n", "5\n")])
    assert check.verdict == Verdict.OK, check.stderr


def test_suite_is_large_enough():
    assert len(PROGRAMS) >= 30
    assert {p.suffix for p in PROGRAMS} == {".py", ".cpp"}


@pytest.mark.parametrize("path", PROGRAMS, ids=[p.name for p in PROGRAMS])
def test_hostile_program(executor: Executor, path: Path, guarded_files: None) -> None:
    check_hostile(executor, path)


@pytest.fixture(scope="module")
def permissive_executor(executor: Executor):
    """Subprocesses allowed (some users need them): then the supervisor alone must clean up."""
    with Executor(workers=1, allow_subprocesses=True) as ex:
        yield ex


def test_setsid_grandchild_cannot_hold_the_test_open(
    permissive_executor: Executor, guarded_files: None
):
    source = (HOSTILE / "py_setsid_grandchild.py").read_text()
    start = time.monotonic()
    [result] = permissive_executor.run("python", source, [TestCase("", "3\n")], Limits(time_s=5))
    assert result.verdict == Verdict.OK, result.stderr
    assert time.monotonic() - start < 1.0  # did not wait for the sleeping grandchild
    assert sandbox_processes(permissive_executor.uids) == []
    assert permissive_executor.leftover_processes() == []


def test_fork_bomb_is_bounded_by_the_process_limit(
    permissive_executor: Executor, guarded_files: None
):
    source = (HOSTILE / "py_fork_bomb.py").read_text()
    limits = Limits(time_s=2, processes=16)
    [result] = permissive_executor.run("python", source, [TestCase("", None)], limits)
    assert result.verdict == Verdict.RUNTIME_ERROR, result.stderr
    assert "BlockingIOError" in result.stderr
    assert sandbox_processes(permissive_executor.uids) == []
    assert permissive_executor.leftover_processes() == []


def _kill_worker_when_busy(ex: Executor, times: int) -> threading.Thread:
    def kill() -> None:
        for _ in range(times):
            time.sleep(0.7)
            os.kill(ex.worker_pids()[0], signal.SIGKILL)
            while not ex.worker_pids():
                time.sleep(0.01)

    thread = threading.Thread(target=kill)
    thread.start()
    return thread


def test_crashed_worker_is_restarted_and_its_test_rerun():
    source = "import time\ntime.sleep(1.5)\nprint(3)\n"
    with Executor(workers=1) as ex:
        first = ex.worker_pids()
        killer = _kill_worker_when_busy(ex, times=1)
        results = ex.run(
            "python", source, [TestCase("", "3\n"), TestCase("", "3\n")], Limits(time_s=3)
        )
        killer.join()
        assert [r.verdict for r in results] == [Verdict.OK, Verdict.OK]
        assert ex.worker_pids() != first
        assert ex.run("python", A_PLUS_B, [TestCase("1 1\n", "2\n")])[0].passed


def test_test_that_kills_its_worker_twice_is_reported_not_lost():
    source = "import time\ntime.sleep(2)\nprint(3)\n"
    with Executor(workers=1) as ex:
        killer = _kill_worker_when_busy(ex, times=2)
        [result] = ex.run("python", source, [TestCase("", "3\n")], Limits(time_s=5))
        killer.join()
        assert result.verdict == Verdict.SANDBOX_VIOLATION
        assert "died twice" in result.stderr
        assert ex.run("python", A_PLUS_B, [TestCase("1 1\n", "2\n")])[0].passed
