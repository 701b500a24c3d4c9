"""A run's evaluation results as typed records, the files that hold them, and the selection.

    run_dir/eval/results.jsonl   one CheckpointResult per evaluated checkpoint (iteration 0: the
                                 initial policy), oldest first, rewritten whole on each append
                                 (atomic: a kill never leaves half a line)
    run_dir/eval/best.json       the checkpoint selected on valid by the selection metric, with
                                 its numbers on every set (its test numbers are the run's result)

The JSON of a record is its dataclasses' fields, nested as they are (to_json / from_json).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rlef_hpc import atomic

SELECTION_SET = "valid"  # the paper selects on valid and reports test


@dataclass(frozen=True)
class Estimate:
    """One n@k solve rate on one set: the mean over problems, its 95% bootstrap interval, and
    the sampling of the rollouts it came from."""

    mean: float
    low: float
    high: float
    problems: int
    temperature: float
    top_p: float


@dataclass(frozen=True)
class SamplingResult:
    """One set of rollouts of a set (one sampling): which metrics it estimated, which it could
    not, the share of rollouts solved by each turn, and how fast it was generated."""

    temperature: float
    top_p: float
    rollouts_per_problem: int
    problems: int
    metrics: list[str]
    skipped: list[str]
    solved_by_turn: list[float]
    seconds: float
    rollouts_per_second: float | None
    sandbox_errors: int = 0  # rollouts the sandbox failed to judge (scored as failures)


@dataclass(frozen=True)
class SetResult:
    problems: int
    metrics: dict[str, Estimate]
    samplings: list[SamplingResult]


@dataclass(frozen=True)
class CheckpointResult:
    """One evaluated checkpoint: a line of results.jsonl."""

    iteration: int
    checkpoint: str  # "init", or the training checkpoint's directory name
    sets: dict[str, SetResult]
    time: float  # when it was recorded (seconds since the epoch)

    def estimate(self, metric: str, set_name: str = SELECTION_SET) -> Estimate | None:
        result = self.sets.get(set_name)
        return None if result is None else result.metrics.get(metric)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CheckpointResult:
        sets = {
            name: SetResult(
                problems=s["problems"],
                metrics={m: Estimate(**row) for m, row in s["metrics"].items()},
                samplings=[SamplingResult(**x) for x in s["samplings"]],
            )
            for name, s in data["sets"].items()
        }
        return cls(data["iteration"], data["checkpoint"], sets, data["time"])

    def values(self, select: str) -> dict[str, float]:
        """The record as metrics.jsonl's numbers: SET/METRIC (and _low, _high) for every set,
        the valid set's also without the prefix, and solved_by_turn_T of the valid rollouts
        sampled as the selection metric is (plots/solve_rate.png)."""
        values = {}
        for name, result in self.sets.items():
            prefixes = (f"{name}/", "") if name == SELECTION_SET else (f"{name}/",)
            for metric, row in result.metrics.items():
                for key in (f"{prefix}{metric}" for prefix in prefixes):
                    values.update({key: row.mean, f"{key}_low": row.low, f"{key}_high": row.high})
        valid = self.sets.get(SELECTION_SET)
        samplings = valid.samplings if valid else []
        sampling = next((s for s in samplings if select in s.metrics), None)
        for turn, share in enumerate(sampling.solved_by_turn if sampling else []):
            values[f"solved_by_turn_{turn + 1}"] = share
        return values


@dataclass(frozen=True)
class Selection:
    """best.json: the checkpoint selected on valid by `metric`."""

    metric: str
    result: CheckpointResult


def best(records: Iterable[CheckpointResult], metric: str) -> CheckpointResult | None:
    """The record with the highest `metric` on valid; on a tie the earliest (less training
    for the same measured skill). None when no record has the metric on valid."""
    scored = [(e.mean, r) for r in records if (e := r.estimate(metric)) is not None]
    if not scored:
        return None
    top = max(s for s, _ in scored)
    return min((r for s, r in scored if s == top), key=lambda r: r.iteration)


# --- the files ---------------------------------------------------------------------------


def eval_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "eval"


def results_path(run_dir: str | Path) -> Path:
    return eval_dir(run_dir) / "results.jsonl"


def read_results(run_dir: str | Path) -> list[CheckpointResult]:
    """The records of results.jsonl in iteration order (none if there is no file)."""
    path = results_path(run_dir)
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return [CheckpointResult.from_json(json.loads(line)) for line in lines]


def evaluated(run_dir: str | Path) -> set[int]:
    return {r.iteration for r in read_results(run_dir)}


def write_results(run_dir: str | Path, records: Sequence[CheckpointResult]) -> None:
    eval_dir(run_dir).mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r.to_json()) + "\n" for r in records)
    atomic.write_text(results_path(run_dir), text)


def write_best(run_dir: str | Path, selection: Selection) -> None:
    body = {"metric": selection.metric, **selection.result.to_json()}
    atomic.write_text(eval_dir(run_dir) / "best.json", json.dumps(body, indent=2))


def read_best(run_dir: str | Path) -> Selection | None:
    path = eval_dir(run_dir) / "best.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return Selection(data.pop("metric"), CheckpointResult.from_json(data))
