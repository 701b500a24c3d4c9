"""The evaluation's plots (PNG, matplotlib's Agg backend): a run's learning curve
(eval/curve.png) and one set of rollouts' solve rate against the sample budget (rlef-eval's
solve_rate.png)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlef_hpc import atomic
from rlef_hpc.data.trajectory import Trajectory
from rlef_hpc.eval.analysis import SAMPLE_CURVE_N, sample_curve
from rlef_hpc.eval.report import outcomes_by_problem
from rlef_hpc.eval.results import CheckpointResult
from rlef_hpc.eval.tables import columns


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curve(records: Sequence[CheckpointResult], path: str | Path) -> Path | None:
    """Solve rate against iteration: a panel per metric, a line per set, the CI as a band.
    Written through a temporary file (a reader never sees half a PNG)."""
    cols = columns(records)
    if not cols:
        return None
    plt = _pyplot()
    metrics = list(dict.fromkeys(m for _, m in cols))
    fig, axes = plt.subplots(
        1, len(metrics), figsize=(4.5 * len(metrics), 3.5), dpi=120, squeeze=False
    )
    ordered = sorted(records, key=lambda r: r.iteration)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for set_name in dict.fromkeys(s for s, m in cols if m == metric):
            points = [(r.iteration, row) for r in ordered if (row := r.estimate(metric, set_name))]
            xs = [x for x, _ in points]
            ax.plot(xs, [100 * p.mean for _, p in points], marker="o", label=set_name)
            ax.fill_between(
                xs, [100 * p.low for _, p in points], [100 * p.high for _, p in points],
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


def plot_solve_rate(
    trajectories: Sequence[Trajectory], path: str | Path, max_turns: int = 3, title: str = ""
) -> Path:
    """Solve rate against sample budget k (1@k and 10@k), as a PNG."""
    plt = _pyplot()
    grouped = outcomes_by_problem(trajectories)
    fewest = min(len(o) for o in grouped.values())
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for n in SAMPLE_CURVE_N:
        curve = sample_curve(grouped, n, max_turns)
        ax.plot(
            [k for k, _ in curve],
            [100 * r for _, r in curve],
            marker="o",
            markersize=3,
            label=f"{n}@k",
        )
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
