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


class SandboxCounts:
    """Per iteration, over the whole batch: the episodes the update trains on and those it
    leaves out (a sandbox error: Trajectory.trainable), and what the iteration added to the
    sandbox's own counters (tests that ended SANDBOX_ERROR, workers replaced; rlef_hpc.sandbox
    Executor) on every rank that ran episodes. Collective (every rank calls `batch`)."""

    def __init__(self, executor: Any) -> None:
        self.executor = executor
        self.seen = (0, 0)  # the counters when the last iteration or evaluation ended

    def skip(self) -> None:
        """What the sandbox counted since the last call is not an iteration's (an evaluation's:
        its report counts them)."""
        self.seen = (self.executor.sandbox_errors, self.executor.worker_restarts)

    def batch(self, trajectories: Sequence[Trajectory]) -> dict[str, float]:
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        from rlef_hpc.dist_env import sum_over_ranks

        # The ranks of one data-parallel share hold the same trajectories: counted once.
        holders = dist.get_world_size() / ps.get_data_parallel_world_size()
        excluded = sum(not t.trainable for t in trajectories)
        before = self.seen
        self.skip()
        errors, restarts = (a - b for a, b in zip(self.seen, before, strict=True))
        return sum_over_ranks(
            {
                "trained_episodes": (len(trajectories) - excluded) / holders,
                "sandbox_errors": excluded / holders,
                "sandbox_test_errors": float(errors),
                "sandbox_worker_restarts": float(restarts),
            }
        )


def brief(m: dict[str, float], layout: str) -> str:
    """An iteration's line: reward, solve rate, KL, the engine's mismatch, how the rollouts
    came (generated here, or waited for from the rollout workers) and the update's time."""
    if layout == "disaggregated":
        rollout = f"waited {m['rollout_seconds']:.1f}s for shards"
    else:
        tokens = m["generated_tokens_per_second"]
        rollout = f"rollout {m['rollout_seconds']:.1f}s ({tokens:.0f} tok/s)"
    line = (
        f"reward {m['reward_mean']:+.3f}, solved {100 * m['success_rate']:.1f}%, "
        f"kl {m.get('kl', 0.0):.4f}, mismatch {m.get('mismatch_max', 0.0):.2e}, "
        f"{rollout}, update {m['update_seconds']:.1f}s"
    )
    if m.get("sandbox_errors") or m.get("sandbox_worker_restarts"):
        line += (
            f", sandbox errors: {m['sandbox_errors']:.0f} episodes not trained on "
            f"({m['sandbox_test_errors']:.0f} tests, {m['sandbox_worker_restarts']:.0f} "
            "worker restarts)"
        )
    return line


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
