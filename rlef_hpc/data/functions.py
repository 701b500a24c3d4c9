"""Function-completion problems (HumanEval+, MBPP+ style) for the transfer evaluation, run
through the same executor as everything else.

A problem is a prompt (signature and docstring), an entry point, a canonical solution, and
either test inputs (EvalPlus: base_input, plus_input) or assertion code (HumanEval: `test`
defining check(candidate)). It becomes a Problem whose tests feed the arguments on stdin to a
harness appended to the solution; the harness prints the result in a canonical token form
(containers spelled out, so that real numbers compare within 1e-5 like any output). Expected
outputs are the canonical solution's, computed in the sandbox; they never enter the
solution's process. Base inputs are the public tests, plus inputs the private ones.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlef_hpc.data.codecontests import ProblemFormatError, require_field
from rlef_hpc.data.problem import Problem, Solution
from rlef_hpc.jsonl import JsonLinesError, iter_jsonl
from rlef_hpc.sandbox import Job, TestCase, Verdict

_CANONICAL = """
def _rlef_canonical(value):
    if isinstance(value, (list, tuple)):
        return "[ " + " ".join(map(_rlef_canonical, value)) + " ]"
    if isinstance(value, (set, frozenset)):
        return "{ " + " ".join(sorted(map(_rlef_canonical, value))) + " }"
    if isinstance(value, dict):
        items = sorted((_rlef_canonical(k), _rlef_canonical(v)) for k, v in value.items())
        return "{ " + " ".join(f"{k} : {v}" for k, v in items) + " }"
    if isinstance(value, str):
        return __import__("json").dumps(value)
    return repr(value)
"""
CALL_HARNESS = (
    "import json as _rlef_json, sys as _rlef_sys\n"
    + _CANONICAL
    + "_rlef_args = _rlef_json.loads(_rlef_sys.stdin.read())\n"
    + "print(_rlef_canonical({entry_point}(*_rlef_args)))\n"
)
CHECK_HARNESS = "check({entry_point})\n"


@dataclass(frozen=True)
class FunctionProblem:
    task_id: str
    prompt: str
    entry_point: str
    canonical_solution: str
    base_inputs: Sequence[Sequence[Any]] = ()
    plus_inputs: Sequence[Sequence[Any]] = ()
    test: str = ""  # HumanEval's check(candidate), used when there are no inputs

    @property
    def reference(self) -> str:
        return self.prompt + self.canonical_solution


def load_function_problems(path: str | Path) -> list[FunctionProblem]:
    try:
        return [parse_function_problem(record, where) for where, record in iter_jsonl(path)]
    except JsonLinesError as e:
        raise ProblemFormatError(str(e)) from None


def parse_function_problem(record: Mapping[str, Any], where: str) -> FunctionProblem:
    inputs = {}
    for name in ("base_input", "plus_input"):
        value = require_field(record, name, list, where, default=[])
        if not all(isinstance(args, list) for args in value):
            raise ProblemFormatError(f"{where}: field '{name}': expected a list of argument lists")
        inputs[name] = value
    problem = FunctionProblem(
        task_id=require_field(record, "task_id", str, where),
        prompt=require_field(record, "prompt", str, where),
        entry_point=require_field(record, "entry_point", str, where),
        canonical_solution=require_field(record, "canonical_solution", str, where),
        base_inputs=inputs["base_input"],
        plus_inputs=inputs["plus_input"],
        test=require_field(record, "test", str, where, default=""),
    )
    if not problem.base_inputs and not problem.plus_inputs and not problem.test:
        raise ProblemFormatError(f"{where}: needs 'base_input', 'plus_input' or 'test'")
    return problem


def to_problems(functions: Sequence[FunctionProblem], executor: Any) -> list[Problem]:
    """Problems with expected outputs from each canonical solution (run in the sandbox)."""
    jobs, shapes = [], []
    for fp in functions:
        if fp.base_inputs or fp.plus_inputs:
            harness = CALL_HARNESS.replace("{entry_point}", fp.entry_point)
            inputs = [json.dumps(args) for args in [*fp.base_inputs, *fp.plus_inputs]]
            jobs.append(
                Job.build("python", f"{fp.reference}\n\n{harness}", [TestCase(i) for i in inputs])
            )
        else:
            harness = fp.test + "\n\n" + CHECK_HARNESS.replace("{entry_point}", fp.entry_point)
            inputs = []
        shapes.append((harness, inputs))
    results = iter(executor.run_many(jobs))
    problems = []
    for fp, (harness, inputs) in zip(functions, shapes, strict=True):
        if inputs:
            outcome = next(results)
            bad = [r for r in outcome if r.verdict is not Verdict.OK or r.output_truncated]
            if bad:
                why = f"{bad[0].verdict}, output truncated: {bad[0].output_truncated}"
                raise ValueError(
                    f"{fp.task_id}: the canonical solution fails ({why}) {bad[0].stderr}"
                )
            tests = [TestCase(i, r.output) for i, r in zip(inputs, outcome, strict=True)]
            public, private = tests[: len(fp.base_inputs)], tests[len(fp.base_inputs) :]
        else:
            public, private = [], [TestCase("", None)]  # the assertions pass or they do not
        problems.append(
            Problem(
                name=fp.task_id,
                description=fp.prompt,
                public_tests=public,
                private_tests=private,
                solutions=[Solution("python", fp.reference)],
                harness=harness,
                source=fp.task_id,
                tags=("function",),
            )
        )
    return problems
