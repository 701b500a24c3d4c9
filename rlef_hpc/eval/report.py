"""From trajectories to the n@k table (with bootstrap intervals), per-turn solve rates and a
plot of solve rate against sample budget."""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rlef_hpc.data.trajectory import Trajectory
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
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def outcomes_by_problem(trajectories: Sequence[Trajectory]) -> dict[str, list[RolloutOutcome]]:
    grouped: dict[str, list[RolloutOutcome]] = collections.defaultdict(list)
    for t in trajectories:
        grouped[t.problem].append(
            RolloutOutcome(t.turns[-1].passed_public, t.success, len(t.turns))
        )
    return dict(grouped)


def evaluate(
    trajectories: Sequence[Trajectory],
    metrics: Sequence[str] = ("1@3", "10@100"),
    max_turns: int = 3,
    seed: int = 0,
) -> EvalReport:
    grouped = outcomes_by_problem(trajectories)
    if not grouped:
        raise ValueError("no trajectories to evaluate")
    fewest = min(len(o) for o in grouped.values())
    rows, skipped = [], []
    for name in metrics:
        n, k = parse_metric(name)
        if k // max_turns > fewest:
            skipped.append(f"{name} needs {k // max_turns} rollouts per problem; have {fewest}")
            continue
        per_problem = [n_at_k(o, n, k, max_turns) for o in grouped.values()]
        rows.append(MetricRow(name, *bootstrap_ci(per_problem, seed=seed), len(per_problem)))
    everything = [o for outcomes in grouped.values() for o in outcomes]
    return EvalReport(rows, solved_by_turn(everything, max_turns), fewest, len(grouped), skipped)


def plot_solve_rate(
    trajectories: Sequence[Trajectory], path: str | Path, max_turns: int = 3, title: str = ""
) -> Path:
    """Solve rate against sample budget k (1@k and 10@k), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped = outcomes_by_problem(trajectories)
    fewest = min(len(o) for o in grouped.values())
    budgets = [max_turns * m for m in range(1, fewest + 1)]
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for n in (1, 10):
        rates = [
            sum(n_at_k(o, n, k, max_turns) for o in grouped.values()) / len(grouped)
            for k in budgets
        ]
        ax.plot(budgets, [100 * r for r in rates], marker="o", markersize=3, label=f"{n}@k")
    ax.set_xlabel(f"sample budget k (turns; {max_turns} per rollout)")
    ax.set_ylabel("solve rate (%)")
    ax.set_title(title or f"{len(grouped)} problems, {fewest} rollouts each")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
