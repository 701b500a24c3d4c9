"""Verdicts on known programs, in both languages, and the executor's public contract."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest

from rlef_hpc import sandbox
from rlef_hpc.sandbox import Executor, Job, Limits, TestCase, Verdict
from tests.test_hostile import header

PROGRAMS = sorted((Path(__file__).parent / "programs").iterdir())
PROBLEMS = {
    "sum": [
        TestCase("1 2\n", "3\n"),
        TestCase("-5 5\n", "0\n"),
        TestCase("1000000000000 1\n", "1000000000001\n"),
    ],
    "sort": [
        TestCase("3\n3 1 2\n", "1 2 3\n"),
        TestCase("1\n7\n", "7\n"),
        TestCase("4\n4 4 1 0\n", "0 1 4 4\n"),
    ],
    "mean": [TestCase("3\n1 2 4\n", "2.333333333\n"), TestCase("2\n0.1 0.2\n", "0.15\n")],
}


@pytest.mark.parametrize("path", PROGRAMS, ids=[p.name for p in PROGRAMS])
def test_verdicts_on_known_programs(executor: Executor, path: Path) -> None:
    """Each program names its problem (`first`: only its first test) and expected verdicts."""
    meta = header(path)
    problem, *first = meta["problem"].split()
    tests = PROBLEMS[problem][:1] if first else PROBLEMS[problem]
    language = "python" if path.suffix == ".py" else "cpp"
    results = executor.run(language, path.read_text(), tests, Limits(time_s=1))
    assert [r.verdict.value for r in results] == meta["expect"].split(), [r.stderr for r in results]


def test_python_traceback_is_clean_of_sandbox_frames(executor: Executor) -> None:
    source = "def f(x):\n    return 1 // x\n\nprint(f(int(input())))\n"
    [r] = executor.run("python", source, [TestCase("0\n", "1\n")])
    assert r.verdict == Verdict.RUNTIME_ERROR
    assert r.stderr.startswith('Traceback (most recent call last):\n  File "solution.py", line 4')
    assert "return 1 // x" in r.stderr and r.stderr.endswith(
        "ZeroDivisionError: integer division or modulo by zero\n"
    )
    assert "worker" not in r.stderr and "rlef_hpc" not in r.stderr


def test_output_before_a_crash_is_kept(executor: Executor) -> None:
    [r] = executor.run(
        "python", "print('partial')\nraise ValueError('boom')\n", [TestCase("", "x\n")]
    )
    assert r.verdict == Verdict.RUNTIME_ERROR
    assert r.output == "partial\n" and "ValueError: boom" in r.stderr


def test_time_and_memory_are_measured(executor: Executor) -> None:
    spin = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3:\n    pass\n"
    [r] = executor.run("python", spin, [TestCase("", None)])
    assert 0.28 <= r.time_s <= 0.6 and r.wall_s >= 0.28
    [small, big] = executor.run_many(
        [
            Job.build("python", "print(1)\n", [TestCase("", "1\n")]),
            Job.build(
                "python",
                "x = bytearray(100 << 20)\nx[::4096] = b'1' * len(x[::4096])\nprint(1)\n",
                [TestCase("", "1\n")],
            ),
        ]
    )
    assert small[0].memory_kb < 8 << 10
    assert 95 << 10 <= big[0].memory_kb <= 130 << 10


def test_memory_limit_is_enforced(executor: Executor) -> None:
    grab = "x = bytearray({} << 20)\nx[::4096] = b'1' * len(x[::4096])\nprint(1)\n"
    [fits] = executor.run("python", grab.format(100), [TestCase("", "1\n")], Limits(memory_mb=200))
    [over] = executor.run("python", grab.format(300), [TestCase("", "1\n")], Limits(memory_mb=200))
    assert fits.verdict == Verdict.OK and over.verdict == Verdict.MEMORY_LIMIT


# Programs that run out of memory: each must be judged MEMORY_LIMIT, and end when it does, not
# sit at its limit until the clock kills it (a Python recursion used to: TIME_LIMIT, 2.5 s).
OUT_OF_MEMORY = {
    "py_unbounded_recursion": (
        "python",
        "import sys\nsys.setrecursionlimit(10**7)\n\n\ndef f(n):\n    return f(n + 1) + 1\n\n\n"
        "print(f(0))\n",
    ),
    "py_unbounded_list": ("python", "a = []\nwhile True:\n    a.append([len(a)])\n"),
    "py_unbounded_string": ("python", "s = 'x'\nwhile True:\n    s += s\n"),
    "cpp_unbounded_vector": (
        "cpp",
        "#include <vector>\nint main() {\n  std::vector<long long> v;\n"
        "  for (;;) v.push_back(1);\n}\n",
    ),
    "cpp_unbounded_nested_vectors": (
        "cpp",
        "#include <vector>\nint main() {\n  std::vector<std::vector<int>> v;\n"
        "  for (;;) v.emplace_back(1000, 1);\n}\n",
    ),
}
OUT_OF_MEMORY_LIMITS = Limits(time_s=10.0, memory_mb=256)
# CPU seconds to fill 256 MB, with room for a loaded machine: sitting at the limit took 2-3 s.
FILL_CPU_S = 1.5


@pytest.mark.parametrize("name", sorted(OUT_OF_MEMORY))
def test_running_out_of_memory_is_memory_limit_at_once(executor: Executor, name: str) -> None:
    from rlef_hpc.episodes.templates import Templates, failure_line

    language, source = OUT_OF_MEMORY[name]
    if language == "cpp":  # compile outside the timed run
        executor.run("cpp", source, [TestCase("", None)], Limits(time_s=0.01))
    [r] = executor.run(language, source, [TestCase("", None)], OUT_OF_MEMORY_LIMITS)
    assert r.verdict == Verdict.MEMORY_LIMIT, (r.exit_code, r.memory_kb, r.stderr)
    assert r.wall_s < OUT_OF_MEMORY_LIMITS.time_s / 2 and r.time_s < FILL_CPU_S, r
    assert "Out of memory" in failure_line(Templates(), "", None, r)


def test_cpp_stack_overflow_is_a_crash_not_out_of_memory(executor: Executor) -> None:
    """The stack has a limit of its own (half the memory): recursing without bound overflows
    it, a crash (SIGSEGV), long before the memory limit is reached."""
    source = (
        "#include <cstdio>\nint down(int n) {\n  volatile char pad[64];\n  pad[0] = n;\n"
        '  return down(n + 1) + pad[0];\n}\nint main() { printf("%d\\n", down(0)); }\n'
    )
    executor.run("cpp", source, [TestCase("", None)], Limits(time_s=0.01))
    [r] = executor.run("cpp", source, [TestCase("", None)], OUT_OF_MEMORY_LIMITS)
    assert r.verdict == Verdict.RUNTIME_ERROR and r.exit_code == -11, (r.exit_code, r.stderr)
    assert r.wall_s < OUT_OF_MEMORY_LIMITS.time_s / 2 and r.time_s < FILL_CPU_S, r


def test_a_caught_failed_allocation_is_the_solutions_to_handle(executor: Executor) -> None:
    """Only a process at its limit is ended: one request larger than the limit raises
    MemoryError as usual, and a solution that catches it carries on."""
    source = "try:\n    x = bytearray(10**12)\nexcept MemoryError:\n    x = None\nprint(1)\n"
    [r] = executor.run("python", source, [TestCase("", "1\n")], OUT_OF_MEMORY_LIMITS)
    assert r.verdict == Verdict.OK, r.stderr


def test_stop_on_first_failure(executor: Executor) -> None:
    tests = [TestCase("1 1\n", "2\n"), TestCase("1 1\n", "3\n"), TestCase("1 1\n", "2\n")]
    source = "a, b = map(int, input().split())\nprint(a + b)\n"
    stopped = executor.run("python", source, tests, stop_on_first_failure=True)
    assert [r.verdict for r in stopped] == [Verdict.OK, Verdict.WRONG_ANSWER]
    full = executor.run("python", source, tests)
    assert [r.verdict for r in full] == [Verdict.OK, Verdict.WRONG_ANSWER, Verdict.OK]


def test_nothing_leaks_between_tests(executor: Executor) -> None:
    source = "import os\nprint(sorted(os.listdir('.')))\nopen('state.txt', 'w').write('x')\n"
    results = executor.run("python", source, [TestCase("", "[]\n")] * 6, stop_on_first_failure=True)
    assert [r.verdict for r in results] == [Verdict.OK] * 6


def test_run_many_keeps_order_and_results(executor: Executor) -> None:
    jobs = [
        Job.build(
            "python",
            f"print({i} + int(input()))\n",
            [TestCase(f"{j}\n", f"{i + j}\n") for j in range(5)],
        )
        for i in range(20)
    ]
    results = executor.run_many(jobs)
    assert len(results) == 20 and all(len(r) == 5 and all(t.passed for t in r) for r in results)


def test_run_async(executor: Executor) -> None:
    async def main() -> list[list[sandbox.TestResult]]:
        return await asyncio.gather(
            *(
                executor.run_async(
                    "python", "print(int(input()) * 2)\n", [TestCase(f"{i}\n", f"{2 * i}\n")]
                )
                for i in range(8)
            )
        )

    assert all(r[0].passed for r in asyncio.run(main()))


def test_exact_compare_mode(executor: Executor) -> None:
    [tokens] = executor.run("python", "print('1  2')\n", [TestCase("", "1 2\n")])
    [exact] = executor.run("python", "print('1  2')\n", [TestCase("", "1 2\n")], compare="exact")
    assert tokens.passed and exact.verdict == Verdict.WRONG_ANSWER


def test_capabilities_report_the_isolation(executor: Executor) -> None:
    caps = executor.capabilities
    assert caps["seccomp"] and caps["rlimits"]
    assert caps["pid_ns"] and caps["net_ns"] and caps["mount_ns"]
    assert caps == sandbox.capabilities()


def test_refuses_without_seccomp_unless_unsafe() -> None:
    with pytest.raises(sandbox.SandboxUnavailableError, match="unsafe=True"):
        Executor(workers=1, seccomp=False)
    with Executor(workers=1, seccomp=False, unsafe=True) as ex:
        assert ex.capabilities["seccomp"] is False
        assert ex.run("python", "print(2)\n", [TestCase("", "2\n")])[0].passed


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda ex: ex.run("rust", "fn main(){}", []),
            "unknown language 'rust'; expected one of python, cpp",
        ),
        (lambda ex: ex.run("python", b"print(1)", []), "source must be a string"),
        (
            lambda ex: ex.run("python", "print(1)", [{"output": "1"}]),
            "test 0: missing field 'input'",
        ),
        (
            lambda ex: ex.run("python", "print(1)", [{"input": 5}]),
            "test 0: field 'input' must be a string",
        ),
        (lambda ex: ex.run("python", "print(1)", [("1",)]), "test 0: expected"),
        (
            lambda ex: ex.run("python", "print(1)", [], compare="fuzzy"),
            "unknown compare mode 'fuzzy'",
        ),
        (lambda ex: Limits(time_s=-1), "limits.time_s must be positive, got -1"),
        (lambda ex: Limits(memory_mb=math.nan), "limits.memory_mb must be positive"),
        (lambda ex: Executor(workers=0), "workers must be a positive integer"),
    ],
)
def test_bad_input_gives_one_clear_error(executor: Executor, call, message: str) -> None:
    with pytest.raises(ValueError) as err:
        call(executor)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_problem_limits_default_to_rlef() -> None:
    assert Limits.for_problem() == Limits(time_s=10.0, memory_mb=1024)
    assert Limits.for_problem(2.5, 256 << 20) == Limits(time_s=2.5, memory_mb=256)
    assert Limits.for_problem(0, 0).time_s == 10.0  # CodeContests stores 0 for "none given"


def test_rlimits_field_order_is_the_c_sides() -> None:
    from rlef_hpc.sandbox import _executor
    from rlef_hpc.sandbox.rlimits import Rlimits

    assert Rlimits._fields == _executor.RLIMIT_FIELDS


def test_each_named_limit_reaches_the_tests_process(executor: Executor) -> None:
    """A solution reads its own rlimits: a field swapped between Python and C shows here."""
    from rlef_hpc.sandbox.rlimits import rlimits_for

    limits = Limits(time_s=3, memory_mb=300, file_size_mb=5, open_files=17, processes=9)
    source = (
        "import resource as r\n"
        "for name in ('AS', 'CPU', 'FSIZE', 'NOFILE', 'NPROC', 'STACK'):\n"
        "    print(name, *r.getrlimit(getattr(r, 'RLIMIT_' + name)))\n"
    )
    [result] = executor.run("python", source, [TestCase("", None)], limits)
    assert result.passed, result.stderr
    seen = {
        name: (int(soft), int(hard))
        for name, soft, hard in map(str.split, result.output.splitlines())
    }
    assert seen["CPU"] == (5, 6)  # int(time_s) + 2, then SIGKILL a second later
    assert seen["FSIZE"] == (5 << 20,) * 2
    assert seen["NOFILE"] == (17, 17)
    assert seen["NPROC"] == (9, 9)
    assert seen["STACK"] == (150 << 20,) * 2
    # A forked Python test's budget comes on top of the server's address space.
    assert seen["AS"][0] == seen["AS"][1] > 300 << 20
    native = rlimits_for(limits, native=True, inherited_vm_bytes=1 << 30)
    assert native.address_space == 300 << 20 and native.stack == 150 << 20


def test_a_malformed_message_is_rejected() -> None:
    import os

    from rlef_hpc.sandbox import protocol
    from rlef_hpc.sandbox.protocol import RESULT, TO_EXECUTOR, TO_SERVER, ProtocolError, Report

    report = Report(
        type=RESULT,
        index=0,
        verdict="OK",
        time_s=0.0,
        wall_s=0.0,
        memory_kb=0,
        exit_code=0,
        stdout=b"",
        stderr="",
    )
    protocol.check_message(report, TO_EXECUTOR)
    missing = {k: v for k, v in report.items() if k != "stdout"}
    with pytest.raises(ProtocolError, match=r"missing \['stdout'\]"):
        protocol.check_message(missing, TO_EXECUTOR)
    with pytest.raises(ProtocolError, match=r"unknown \['extra'\]"):
        protocol.check_message({**report, "extra": 1}, TO_EXECUTOR)
    with pytest.raises(ProtocolError, match="unexpected message"):
        protocol.check_message(report, TO_SERVER)  # a result is never sent to a server
    r, w = os.pipe()
    try:
        protocol.write_frame(w, missing)
        with pytest.raises(ProtocolError):
            protocol.read_message(r, TO_EXECUTOR)
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize(
    ("obs", "memory_kb", "verdict"),
    [
        ({"reason": 2, "code": -9, "cpu_s": 0.1, "stderr": b""}, 0, Verdict.OUTPUT_LIMIT),
        ({"reason": 0, "code": -31, "cpu_s": 0.1, "stderr": b""}, 0, Verdict.SANDBOX_VIOLATION),
        ({"reason": 1, "code": -9, "cpu_s": 0.1, "stderr": b""}, 0, Verdict.TIME_LIMIT),
        # Killed by the clock while it sat at its memory limit: out of memory first.
        ({"reason": 1, "code": -9, "cpu_s": 1.5, "stderr": b""}, 99 << 10, Verdict.MEMORY_LIMIT),
        # Near the limit but exited cleanly: it fit.
        ({"reason": 0, "code": 0, "cpu_s": 0.1, "stderr": b""}, 99 << 10, Verdict.OK),
        ({"reason": 0, "code": 0, "cpu_s": 1.5, "stderr": b""}, 0, Verdict.TIME_LIMIT),
        (
            {"reason": 0, "code": 1, "cpu_s": 0.1, "stderr": b"MemoryError\n"},
            0,
            Verdict.MEMORY_LIMIT,
        ),
        ({"reason": 0, "code": -6, "cpu_s": 0.1, "stderr": b""}, 99 << 10, Verdict.MEMORY_LIMIT),
        (
            {"reason": 0, "code": 1, "cpu_s": 0.1, "stderr": b"ValueError\n"},
            0,
            Verdict.RUNTIME_ERROR,
        ),
        ({"reason": 0, "code": 0, "cpu_s": 0.1, "stderr": b""}, 0, Verdict.OK),
    ],
)
def test_verdict_of_an_observation(obs: dict, memory_kb: int, verdict: Verdict) -> None:
    from rlef_hpc.sandbox.verdicts import verdict_of

    assert verdict_of(obs, Limits(time_s=1, memory_mb=100), memory_kb) is verdict
