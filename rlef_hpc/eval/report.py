"""From trajectories to the n@k table (with bootstrap intervals), per-turn solve rates, how
answers change between turns and solve rate against the sample budget (plotted by
rlef_hpc.eval.plots)."""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from rlef_hpc.data.trajectory import Trajectory
from rlef_hpc.eval.analysis import (
    SAMPLE_CURVE_N,
    EditRow,
    edit_statistics,
    resample_distance,
    sample_curve,
)
from rlef_hpc.eval.metrics import RolloutOutcome, bootstrap_ci, n_at_k, parse_metric, solved_by_turn


@dataclass(frozen=True)
class MetricRow:
    name: str
    mean: float
    low: float
    high: float
    problems: int


@dataclass
class EvalReport:
    rows: list[MetricRow]
    solved_by_turn: list[float]
    rollouts_per_problem: int
    problems: int
    skipped: list[str] = field(default_factory=list)  # metrics the rollouts cannot support
    feedback: str = "real"  # what the episodes showed after a failure (EpisodeConfig.feedback)
    edits: list[EditRow] = field(default_factory=list)  # per pair of consecutive turns
    resample_distance: float | None = None  # first answers of two rollouts: the yardstick
    # n@k against k for n in SAMPLE_CURVE_N ("1", "10": JSON keys), as [k, solve rate] pairs
    sample_curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    # Rollouts the sandbox failed to judge: scored as failures (outcomes_by_problem)
    sandbox_errors: int = 0

    def table(self) -> str:
        lines = ["| metric | solve rate | 95% CI | problems |", "|---|---|---|---|"]
        for r in self.rows:
            lines.append(
                f"| {r.name} | {100 * r.mean:.1f}% | [{100 * r.low:.1f}, {100 * r.high:.1f}] "
                f"| {r.problems} |"
            )
        turns = ", ".join(
            f"turn {t + 1}: {100 * v:.1f}%" for t, v in enumerate(self.solved_by_turn)
        )
        lines.append(f"\nsolved by turn (share of rollouts): {turns}")
        lines += [f"not estimated: {s}" for s in self.skipped]
        if self.sandbox_errors:
            lines.append(
                f"sandbox errors: {self.sandbox_errors} rollouts the sandbox failed to judge, "
                "scored as failures"
            )
        lines.append(f"feedback after a failure: {self.feedback}")
        if self.edits:
            lines += [
                "",
                "| turns | pairs | code changed | edit distance | fixed |",
                "|---|---|---|---|---|",
            ]
            lines += [
                f"| {e.turn}->{e.turn + 1} | {e.pairs} | {100 * e.changed:.1f}% "
                f"| {e.distance:.3f} | {100 * e.fixed:.1f}% |"
                for e in self.edits
            ]
        if self.resample_distance is not None:
            lines.append(
                f"edit distance between two rollouts' first answers: {self.resample_distance:.3f}"
            )
        if self.sample_curves:
            names = list(self.sample_curves)
            lines += ["", f"| k | {' | '.join(f'{n}@k' for n in names)} |"]
            lines.append("|---" * (len(names) + 1) + "|")
            columns = [dict(self.sample_curves[n]) for n in names]
            for k in columns[0]:
                lines.append(f"| {k} | {' | '.join(f'{100 * c[k]:.1f}%' for c in columns)} |")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def outcomes_by_problem(trajectories: Sequence[Trajectory]) -> dict[str, list[RolloutOutcome]]:
    """Each problem's rollouts. One the sandbox failed to judge (Trajectory.sandbox_error) is a
    failure: never correct, whatever else it records. Where its public tests passed and its
    private ones could not run, it stays a candidate for submission, one that fails (as a real
    submission that the judge could not run would)."""
    grouped: dict[str, list[RolloutOutcome]] = collections.defaultdict(list)
    for t in trajectories:
        correct = t.success and not t.sandbox_error
        grouped[t.problem].append(RolloutOutcome(t.turns[-1].passed_public, correct, len(t.turns)))
    return dict(grouped)


def score(
    trajectories: Sequence[Trajectory],
    metrics: Sequence[str] = ("1@3", "10@100"),
    max_turns: int = 3,
    seed: int = 0,
    feedback: str = "real",
) -> EvalReport:
    """The report of `trajectories` (several rollouts of each problem); `feedback` names what
    their episodes were shown after a failure."""
    grouped = outcomes_by_problem(trajectories)
    if not grouped:
        raise ValueError("no trajectories to evaluate")
    fewest = min(len(o) for o in grouped.values())
    rows, skipped = [], []
    for name in metrics:
        n, k = parse_metric(name)
        if k < max_turns:  # e.g. 1@3 of 5-turn rollouts: not even one rollout
            skipped.append(f"{name} buys less than one {max_turns}-turn rollout")
            continue
        if k // max_turns > fewest:
            skipped.append(f"{name} needs {k // max_turns} rollouts per problem; have {fewest}")
            continue
        per_problem = [n_at_k(o, n, k, max_turns) for o in grouped.values()]
        rows.append(MetricRow(name, *bootstrap_ci(per_problem, seed=seed), len(per_problem)))
    everything = [o for outcomes in grouped.values() for o in outcomes]
    return EvalReport(
        rows,
        solved_by_turn(everything, max_turns),
        fewest,
        len(grouped),
        skipped,
        feedback=feedback,
        edits=edit_statistics(trajectories, max_turns),
        resample_distance=resample_distance(trajectories),
        sample_curves={str(n): sample_curve(grouped, n, max_turns) for n in SAMPLE_CURVE_N},
        sandbox_errors=sum(t.sandbox_error for t in trajectories),
    )
