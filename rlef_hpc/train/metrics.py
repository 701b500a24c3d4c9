"""What a run leaves for its users: metrics as JSON lines (and TensorBoard, W&B when asked),
evaluation tables, and PNG plots of the curves that tell whether RLEF is working."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlef_hpc.data.trajectory import Trajectory

PLOTS = {
    "reward": ("reward_mean", "mean episode reward"),
    "solve_rate": (None, "train solve rate by turn"),
    "kl": ("kl", "KL to the initial policy (per turn)"),
    "mismatch": ("mismatch_max", "trainer vs engine log-prob, max |diff|"),
}


def episode_metrics(trajectories: Sequence[Trajectory], max_turns: int) -> dict[str, float]:
    n = len(trajectories)
    turns = [len(t.turns) for t in trajectories]
    metrics = {
        "reward_mean": sum(t.total_reward for t in trajectories) / n,
        "success_rate": sum(t.success for t in trajectories) / n,
        "turns_mean": sum(turns) / n,
        "invalid_code_rate": sum(not u.valid for t in trajectories for u in t.turns) / sum(turns),
        # Episodes a sandbox failure ended (no reward: see Trajectory.sandbox_error).
        "sandbox_error_rate": sum(t.sandbox_error for t in trajectories) / n,
        "response_tokens": float(
            sum(u.response_end - u.prompt_end for t in trajectories for u in t.turns)
        ),
    }
    for k in range(max_turns):  # solved within the first k+1 turns
        metrics[f"solved_by_turn_{k + 1}"] = (
            sum(t.success and len(t.turns) <= k + 1 for t in trajectories) / n
        )
    return metrics


class MetricsLog:
    """Rank 0's writer of metrics.jsonl (one record per iteration or evaluation)."""

    def __init__(
        self, run_dir: Path, tensorboard: bool, wandb_project: str | None, config: dict
    ) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        self.wandb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        if wandb_project:
            import wandb

            self.wandb = wandb.init(
                project=wandb_project, dir=str(run_dir), config=config, resume="allow"
            )

    def write(self, kind: str, iteration: int, values: dict[str, Any]) -> None:
        record = {"kind": kind, "iteration": iteration, **values}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        numbers = {k: v for k, v in values.items() if isinstance(v, int | float)}
        if self.tb is not None:
            for key, value in numbers.items():
                self.tb.add_scalar(f"{kind}/{key}", value, iteration)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({f"{kind}/{k}": v for k, v in numbers.items()}, step=iteration)

    def records(self, kind: str) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        lines = self.path.read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["kind"] == kind]

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def plot_training(records: Sequence[dict[str, Any]], out_dir: Path, max_turns: int) -> list[Path]:
    """reward.png, solve_rate.png, kl.png, mismatch.png over iterations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    iterations = [r["iteration"] for r in records]
    paths = []
    for name, (key, title) in PLOTS.items():
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=110)
        if key is None:
            for k in range(max_turns):
                ys = [100 * r.get(f"solved_by_turn_{k + 1}", math.nan) for r in records]
                ax.plot(iterations, ys, marker="o", markersize=3, label=f"within {k + 1} turn(s)")
            ax.set_ylabel("%")
            ax.legend(fontsize=7)
        else:
            ax.plot(iterations, [r.get(key, math.nan) for r in records], marker="o", markersize=3)
        ax.set_xlabel("iteration")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths
