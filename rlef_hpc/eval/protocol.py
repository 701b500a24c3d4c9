"""The paper's evaluation protocol for a run's checkpoints, and the run's table of results.

One evaluation of a checkpoint: on each evaluation set (valid, test, optional HumanEval+/MBPP+
files), every metric (n@k) from rollouts sampled as that metric says (1@3 at temperature 0.2,
10@100 at 1.0 and top-p 0.95): one set of `rollouts` rollouts per problem per distinct
sampling, shared by the metrics that sample alike; bootstrap intervals over problems and solve
rate by turn per sampling (rlef_hpc.eval.report does the estimating).

The results of a run, in run_dir/eval/:
    results.jsonl   one record per evaluated checkpoint (iteration 0: the initial policy),
                    rewritten whole on each append (atomic: a kill never leaves half a line)
    curve.md        solve rate against iteration, per set and metric; the best row marked
    curve.png       the same as a plot: one panel per metric, valid and test as lines
    best.json       the checkpoint selected on the valid set by the selection metric, with
                    its numbers on every set (its test numbers are the run's result)

Which checkpoints are due (every `eval_every` iterations, and the run's last) and which of
them are still to be evaluated: what retention keeps (with the best) and what an evaluation
worker does next. Nothing here generates: callers hand in a `Generate` (the trainer's own
engine, or a vLLM engine of an exported checkpoint).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlef_hpc import atomic
from rlef_hpc.data.problem import Problem
from rlef_hpc.data.trajectory import Trajectory
from rlef_hpc.eval.metrics import parse_metric
from rlef_hpc.eval.report import evaluate

SELECTION_SET = "valid"  # the paper selects on valid and reports test


@dataclass(frozen=True)
class MetricSpec:
    """One n@k solve rate and how its rollouts are sampled."""

    name: str = "1@3"
    temperature: float = 0.2
    top_p: float = 0.95

    def __post_init__(self) -> None:
        parse_metric(self.name)  # a malformed name is refused with the config, not mid-run
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(
                f"metric {self.name}: temperature must be >= 0 and top_p in (0, 1], got "
                f"{self.temperature}, {self.top_p}"
            )

    @property
    def sampling(self) -> tuple[float, float]:
        return (self.temperature, self.top_p)


# The paper's: 1@3 at temperature 0.2; 10@100 at 1.0, top-p 0.95 (needs 33 rollouts/problem).
PAPER_METRICS = (MetricSpec("1@3", 0.2, 0.95), MetricSpec("10@100", 1.0, 0.95))

# Episodes of these problems (each repeated once per rollout) sampled at (temperature, top_p);
# `key` names the draw, so that a seeded engine samples the same episodes when it is redone.
Generate = Callable[[list[Problem], float, float, str], list[Trajectory]]


def by_sampling(metrics: Sequence[MetricSpec]) -> dict[tuple[float, float], list[str]]:
    """Metric names grouped by their sampling, in the order first named: one set of rollouts
    per group."""
    groups: dict[tuple[float, float], list[str]] = {}
    for m in metrics:
        groups.setdefault(m.sampling, []).append(m.name)
    return groups


def min_rollouts(metrics: Sequence[MetricSpec], max_turns: int) -> int:
    """The fewest rollouts per problem that estimate every metric (10@100, 3 turns: 33)."""
    return max(parse_metric(m.name)[1] // max_turns for m in metrics)


@dataclass(frozen=True)
class Draw:
    """One set of rollouts of an evaluation: which problems (each repeated once per rollout),
    sampled how, under which seed key, for which metrics."""

    set_name: str
    problems: list[Problem]
    temperature: float
    top_p: float
    key: str
    metrics: list[str]


def draws(
    sets: Mapping[str, Sequence[Problem]],
    metrics: Sequence[MetricSpec],
    rollouts: int,
    iteration: int,
) -> list[Draw]:
    """The rollouts one evaluation generates, in order: per non-empty set, one draw per
    distinct sampling. Every rank of a trainer walks the same list (its collectives match)."""
    out = []
    for name, problems in sets.items():
        if not problems:
            continue
        repeated = [p for p in problems for _ in range(rollouts)]
        for (temperature, top_p), names in by_sampling(metrics).items():
            key = f"eval-{iteration}-{name}-t{temperature}-p{top_p}"
            out.append(Draw(name, repeated, temperature, top_p, key, names))
    return out


def score_draw(
    draw: Draw, trajectories: Sequence[Trajectory], max_turns: int, seconds: float, seed: int = 0
) -> dict[str, Any]:
    """One draw's rollouts scored: its metrics (bootstrap CIs), solve rate by turn, speed."""
    report = evaluate(trajectories, draw.metrics, max_turns, seed)
    return {
        "temperature": draw.temperature,
        "top_p": draw.top_p,
        "rollouts_per_problem": report.rollouts_per_problem,
        "problems": report.problems,
        "metrics": {
            r.name: {"mean": r.mean, "low": r.low, "high": r.high, "problems": r.problems}
            for r in report.rows
        },
        "skipped": report.skipped,
        "solved_by_turn": report.solved_by_turn,
        "seconds": seconds,
        "rollouts_per_second": len(trajectories) / seconds if seconds > 0 else None,
    }


def evaluate_checkpoint(
    generate: Generate,
    sets: Mapping[str, Sequence[Problem]],
    metrics: Sequence[MetricSpec],
    rollouts: int,
    max_turns: int,
    iteration: int,
    checkpoint: str,
    seed: int = 0,
) -> dict[str, Any]:
    """The record of one checkpoint on every non-empty set, as results.jsonl holds it: per
    set, its samplings (each with its own rollouts' metrics, solve rate by turn and rollouts/s)
    and `metrics`, every estimate by name with the sampling it came from."""
    record: dict[str, Any] = {"iteration": iteration, "checkpoint": checkpoint, "sets": {}}
    for draw in draws(sets, metrics, rollouts, iteration):
        start = time.perf_counter()
        trajectories = generate(draw.problems, draw.temperature, draw.top_p, draw.key)
        sampling = score_draw(draw, trajectories, max_turns, time.perf_counter() - start, seed)
        result = record["sets"].setdefault(
            draw.set_name, {"problems": sampling["problems"], "metrics": {}, "samplings": []}
        )
        result["samplings"].append({**sampling, "metrics": sorted(sampling["metrics"])})
        for name, row in sampling["metrics"].items():
            result["metrics"][name] = {**row, "temperature": draw.temperature, "top_p": draw.top_p}
    record["time"] = time.time()
    return record


# --- the run's table ---------------------------------------------------------------------


def eval_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "eval"


def results_path(run_dir: str | Path) -> Path:
    return eval_dir(run_dir) / "results.jsonl"


def read_results(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of results.jsonl in the order appended (none if there is no file)."""
    path = results_path(run_dir)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def evaluated(run_dir: str | Path) -> set[int]:
    return {r["iteration"] for r in read_results(run_dir)}


def append_result(run_dir: str | Path, record: Mapping[str, Any], select: str = "1@3") -> bool:
    """Adds `record` to results.jsonl unless its iteration is there already (an evaluation
    redone after a requeue is not counted twice), then rewrites the curve and best.json.
    Returns whether it was added."""
    records = read_results(run_dir)
    if any(r["iteration"] == record["iteration"] for r in records):
        return False
    records = sorted([*records, dict(record)], key=lambda r: r["iteration"])
    eval_dir(run_dir).mkdir(parents=True, exist_ok=True)
    atomic.write_text(results_path(run_dir), "".join(json.dumps(r) + "\n" for r in records))
    write_summary(run_dir, records, select)
    return True


def score(record: Mapping[str, Any], metric: str, set_name: str = SELECTION_SET) -> float | None:
    row = record.get("sets", {}).get(set_name, {}).get("metrics", {}).get(metric)
    return None if row is None else row["mean"]


def best(records: Iterable[Mapping[str, Any]], metric: str = "1@3") -> dict[str, Any] | None:
    """The record with the highest `metric` on valid; on a tie the earliest (less training
    for the same measured skill). None when no record has the metric on valid."""
    scored = [(s, r) for r in records if (s := score(r, metric)) is not None]
    if not scored:
        return None
    top = max(s for s, _ in scored)
    return dict(min((r for s, r in scored if s == top), key=lambda r: r["iteration"]))


def read_best(run_dir: str | Path) -> dict[str, Any] | None:
    path = eval_dir(run_dir) / "best.json"
    return json.loads(path.read_text()) if path.exists() else None


def write_summary(run_dir: str | Path, records: Sequence[Mapping[str, Any]], select: str) -> None:
    """curve.md, curve.png and best.json from the records so far."""
    out = eval_dir(run_dir)
    chosen = best(records, select)
    if chosen is not None:
        atomic.write_text(out / "best.json", json.dumps({"metric": select, **chosen}, indent=2))
    atomic.write_text(out / "curve.md", curve_table(records, select) + "\n")
    plot_curve(records, out / "curve.png")


def _columns(records: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(set, metric) pairs present in any record, valid first, then test, then the others."""
    seen: dict[tuple[str, str], None] = {}
    for r in records:
        for s, result in r["sets"].items():
            for m in result["metrics"]:
                seen[(s, m)] = None
    order = {"valid": 0, "test": 1}
    return sorted(seen, key=lambda c: (order.get(c[0], 2), c[0]))


def _cell(record: Mapping[str, Any], set_name: str, metric: str) -> str:
    row = record["sets"].get(set_name, {}).get("metrics", {}).get(metric)
    if row is None:
        return "-"
    return f"{100 * row['mean']:.1f}% [{100 * row['low']:.1f}, {100 * row['high']:.1f}]"


def curve_table(
    records: Sequence[Mapping[str, Any]], select: str | None = "1@3", labels: Mapping[int, str] = {}
) -> str:
    """Markdown: one row per evaluated checkpoint (its iteration, or `labels`' name for it),
    one column per (set, metric) with its 95% bootstrap interval; the checkpoint selected on
    valid by `select` is marked (None: no selection)."""
    columns = _columns(records)
    chosen = best(records, select) if select else None
    header = ["iteration", *(f"{s} {m}" for s, m in columns)]
    lines = [f"| {' | '.join(header)} |", "|---" * len(header) + "|"]
    for r in sorted(records, key=lambda r: r["iteration"]):
        mark = " (best)" if chosen is not None and r["iteration"] == chosen["iteration"] else ""
        label = labels.get(r["iteration"], str(r["iteration"]))
        cells = [f"{label}{mark}", *(_cell(r, s, m) for s, m in columns)]
        lines.append(f"| {' | '.join(cells)} |")
    if chosen is not None:
        lines.append(f"\nselected on {SELECTION_SET} {select}: iteration {chosen['iteration']}")
    return "\n".join(lines)


def plot_curve(records: Sequence[Mapping[str, Any]], path: str | Path) -> Path | None:
    """Solve rate against iteration: a panel per metric, a line per set, the CI as a band."""
    columns = _columns(records)
    if not columns:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(dict.fromkeys(m for _, m in columns))
    fig, axes = plt.subplots(
        1, len(metrics), figsize=(4.5 * len(metrics), 3.5), dpi=120, squeeze=False
    )
    ordered = sorted(records, key=lambda r: r["iteration"])
    for ax, metric in zip(axes[0], metrics, strict=True):
        for set_name in dict.fromkeys(s for s, m in columns if m == metric):
            points = [
                (r["iteration"], row)
                for r in ordered
                if (row := r["sets"].get(set_name, {}).get("metrics", {}).get(metric))
            ]
            xs = [x for x, _ in points]
            ax.plot(xs, [100 * p["mean"] for _, p in points], marker="o", label=set_name)
            ax.fill_between(
                xs, [100 * p["low"] for _, p in points], [100 * p["high"] for _, p in points],
                alpha=0.2,
            )  # fmt: skip
        ax.set_xlabel("iteration")
        ax.set_ylabel(f"{metric} solve rate (%)")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    with atomic.replacing(path) as tmp:
        fig.savefig(tmp, format=path.suffix[1:])
    plt.close(fig)
    return path


# --- which checkpoints, when ---------------------------------------------------------------


def is_due(iteration: int, eval_every: int, last: int) -> bool:
    """Iteration 0 (the initial policy), every `eval_every`-th and the run's `last`."""
    return iteration == 0 or iteration == last or bool(eval_every and iteration % eval_every == 0)


def pending(
    checkpoints: Iterable[int], done: Iterable[int], eval_every: int, last: int
) -> list[int]:
    """Iterations among `checkpoints` that are due and not yet evaluated, oldest first."""
    finished = set(done)
    return sorted(i for i in checkpoints if is_due(i, eval_every, last) and i not in finished)


def protected(
    run_dir: str | Path, checkpoints: Iterable[int], eval_every: int, last: int, select: str
) -> set[int]:
    """What retention must keep besides the newest few: the checkpoints still to be
    evaluated, and the best on valid so far (to export, or re-evaluate, at any time)."""
    records = read_results(run_dir)
    keep = set(pending(checkpoints, (r["iteration"] for r in records), eval_every, last))
    chosen = best(records, select)
    if chosen is not None:
        keep.add(chosen["iteration"])
    return keep


# --- the sets, the selected model --------------------------------------------------------


def transfer_sets(paths: Iterable[str | Path], executor: Any) -> dict[str, list[Problem]]:
    """HumanEval+/MBPP+-style function problem files as evaluation sets named after their
    files (expected outputs from the canonical solutions, run in the sandbox)."""
    from rlef_hpc.data.functions import load_function_problems, to_problems

    sets = {}
    for path in paths:
        name = Path(path).stem
        if name in ("valid", "test") or name in sets:
            raise ValueError(f"eval.transfer: {path}: the set name {name!r} is taken")
        sets[name] = to_problems(load_function_problems(path), executor)
    return sets


def export_best(
    run_dir: str | Path, exported: str | Path | None = None, move: bool = False
) -> Path | None:
    """run_dir/best/: the checkpoint selected in best.json as a Hugging Face model, with
    selected.json naming it. From `exported` (that checkpoint already exported: moved there
    with `move`, a rename within the run directory, else copied), else run_dir/init
    (iteration 0) or the training checkpoint. A no-op when best/ already holds the selected
    checkpoint; None when nothing is selected yet."""
    run_dir = Path(run_dir)
    chosen = read_best(run_dir)
    if chosen is None:
        return None
    target = run_dir / "best"
    marker = {"iteration": chosen["iteration"], "checkpoint": chosen["checkpoint"]}
    if (target / "selected.json").exists():
        if json.loads((target / "selected.json").read_text()) == marker:
            return target
    import shutil

    # A reader sees the old model or the new one, or (between two renames) none.
    with atomic.replacing(target, shared=True) as tmp:
        if exported is not None and move:
            os.replace(exported, tmp)
        elif exported is not None:
            shutil.copytree(exported, tmp)
        elif chosen["iteration"] == 0:
            shutil.copytree(run_dir / "init", tmp)
        else:
            from rlef_hpc.checkpoint.convert import export_hf

            export_hf(run_dir / chosen["checkpoint"], tmp)
        (tmp / "selected.json").write_text(json.dumps(marker) + "\n")
    return target


def summary(records: Sequence[Mapping[str, Any]], select: str) -> str:
    """Two lines for a terminal: the selected checkpoint and its numbers on every set."""
    chosen = best(records, select)
    if chosen is None:
        return "best checkpoint: none evaluated yet"
    sets = "; ".join(
        f"{name} " + ", ".join(f"{m} {100 * row['mean']:.1f}%" for m, row in s["metrics"].items())
        for name, s in chosen["sets"].items()
    )
    return f"best checkpoint on valid {select}: iteration {chosen['iteration']} ({sets})"
