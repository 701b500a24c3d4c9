"""HumanEval+/MBPP+ style function problems, judged by the executor through a harness."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlef_hpc.data.codecontests import ProblemFormatError
from rlef_hpc.data.functions import load_function_problems, to_problems
from rlef_hpc.sandbox import Executor, Job

FIXTURE = Path(__file__).parent / "data" / "functions_tiny.jsonl"


@pytest.fixture(scope="module")
def problems(executor: Executor):
    return to_problems(load_function_problems(FIXTURE), executor)


def judge(executor: Executor, problem, code: str) -> list[str]:
    job = Job.build("python", problem.program(code), problem.judge_tests, problem.limits())
    return [r.verdict.value for r in executor.run_many([job])[0]]


def test_expected_outputs_come_from_the_canonical_solution(problems):
    add, evens, shout = problems
    assert [t.input for t in add.public_tests] == ["[1, 2]", "[0.1, 0.2]"]
    assert [t.output for t in add.public_tests] == ["3\n", "0.30000000000000004\n"]
    assert len(add.private_tests) == 3
    assert evens.public_tests[0].output == "[ [ 2 4 ] { 2 4 } ]\n"
    assert shout.public_tests == [] and shout.private_tests[0].output is None


def test_solutions_pass_or_fail_through_the_harness(executor, problems):
    add, evens, shout = problems
    assert judge(executor, add, "def add(a, b):\n    return b + a\n") == ["OK"] * 5
    # Reals compare within 1e-5, even inside containers: 0.1 + 0.2 printed as 0.3 is fine.
    assert judge(executor, add, "def add(a, b):\n    return round(a + b, 6)\n") == ["OK"] * 5
    assert "WRONG_ANSWER" in judge(executor, add, "def add(a, b):\n    return a - b\n")
    assert (
        judge(
            executor,
            evens,
            "def evens(xs):\n    e = [x for x in xs if x % 2 == 0]\n    return tuple(e), set(e)\n",
        )
        == ["OK"] * 3
    )
    assert judge(executor, evens, "def evens(xs):\n    return [], set()\n")[0] == "WRONG_ANSWER"
    assert judge(executor, shout, "def shout(s):\n    return s.upper() + '!'\n") == ["OK"]
    assert judge(executor, shout, "def shout(s):\n    return s + '!'\n") == ["RUNTIME_ERROR"]
    assert judge(executor, shout, "def shout(s):\n    return s.upper(\n") == ["COMPILE_ERROR"]


def test_malformed_function_problems(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"task_id": "x", "prompt": "p", "entry_point": "f", "canonical_solution": "c"}\n'
    )
    with pytest.raises(
        ProblemFormatError, match="bad.jsonl:1: needs 'base_input', 'plus_input' or 'test'"
    ):
        load_function_problems(bad)
    record = '{"task_id": "x", "prompt": "p", "entry_point": "f", "canonical_solution": "c"'
    bad.write_text(record + ', "base_input": [1]}\n')
    with pytest.raises(
        ProblemFormatError, match="field 'base_input': expected a list of argument lists"
    ):
        load_function_problems(bad)
