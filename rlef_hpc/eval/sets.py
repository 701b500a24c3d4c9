"""The evaluation sets of a run: valid (selection) and test (the reported numbers), as the
trainer writes them into the run directory for the evaluation job, and eval.transfer's
HumanEval+/MBPP+-style function problem files."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rlef_hpc.data.problem import Problem

RUN_SETS = ("valid", "test")


def problems_path(run_dir: str | Path, set_name: str) -> Path:
    """run_dir/problems/SET.jsonl: a set's problems (CodeContests JSON lines)."""
    return Path(run_dir) / "problems" / f"{set_name}.jsonl"


def read_run_sets(run_dir: str | Path) -> dict[str, list[Problem]]:
    """The valid and test problems the trainer wrote into `run_dir` (those it wrote)."""
    from rlef_hpc.data.codecontests import load_problems

    return {
        name: load_problems(problems_path(run_dir, name))
        for name in RUN_SETS
        if problems_path(run_dir, name).exists()
    }


def transfer_sets(paths: Iterable[str | Path], executor: Any) -> dict[str, list[Problem]]:
    """HumanEval+/MBPP+-style function problem files as evaluation sets named after their
    files (expected outputs from the canonical solutions, run in the sandbox)."""
    from rlef_hpc.data.functions import load_function_problems, to_problems

    sets = {}
    for path in paths:
        name = Path(path).stem
        if name in RUN_SETS or name in sets:
            raise ValueError(f"eval.transfer: {path}: the set name {name!r} is taken")
        sets[name] = to_problems(load_function_problems(path), executor)
    return sets
