"""The trainer's iteration on batches holding episodes the sandbox failed to judge (run by
tests/test_sandbox_failures.py, one process, a tiny model on the CPU).

The loop's own `Trainer.iteration` with a real PPOUpdate; only the rollout source, the
executor and the config are stand-ins. Prints one JSON line:
- mixed: the largest difference between the weights after an update on [a, error, b, error]
  and after one on [a, b] alone (the errors must change nothing: not the losses, not the
  advantage statistics), how far the update moved them, its metrics;
- empty_minibatch: a minibatch of errors only, whether the weights stay finite;
- all_errors: the metrics of an iteration whose every episode is an error, how many PPO steps
  ran, which of the source's hooks did, how far the weights moved.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ppo_update import MODEL  # noqa: E402 - the script's own folder, put on the path above

from rlef_hpc.data.trajectory import Trajectory, Turn  # noqa: E402
from rlef_hpc.dist_env import init_process_groups  # noqa: E402
from rlef_hpc.models.config import PrecisionConfig  # noqa: E402
from rlef_hpc.models.gpt import build_gpt  # noqa: E402
from rlef_hpc.models.megatron_compat import seed  # noqa: E402
from rlef_hpc.rl.optim import OptimConfig  # noqa: E402
from rlef_hpc.rl.ppo import PPOConfig  # noqa: E402
from rlef_hpc.rl.update import PPOUpdate  # noqa: E402
from rlef_hpc.train.loop import Trainer  # noqa: E402
from rlef_hpc.train.metrics import SandboxCounts  # noqa: E402


def trajectory(seed_: int, spans: list[tuple[int, int, int]], rewards: list[float]) -> Trajectory:
    """Turns of (prompt start, prompt end, response end), with their rewards."""
    g = torch.Generator().manual_seed(seed_)
    length = spans[-1][2]
    tokens = torch.randint(1, MODEL.vocab_size, (length,), generator=g).tolist()
    turns = [
        Turn(a, b, c, (-torch.rand(c - b, generator=g) * 3).tolist(), "", "x", True, reward=r)
        for (a, b, c), r in zip(spans, rewards, strict=True)
    ]
    return Trajectory(f"p{seed_}", "python", tokens, turns, success=rewards[-1] > 0)


class Source:
    def __init__(self, trajectories: list[Trajectory]) -> None:
        self.trajectories, self.hooks = trajectories, []

    def batch(self, iteration: int) -> tuple[list[Trajectory], dict[str, float]]:
        return self.trajectories, {"rollout_seconds": 0.0, "generated_tokens_per_second": 0.0}

    def before_update(self) -> None:
        self.hooks.append("before_update")

    def after_update(self, iteration: int, metrics: dict[str, float]) -> dict[str, float]:
        self.hooks.append("after_update")
        return {}


class Counting(PPOUpdate):
    steps = 0

    def step(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        Counting.steps += 1
        return super().step(*args, **kwargs)


def iteration(trajectories: list[Trajectory], minibatches: int, sandbox: tuple[int, int]) -> Any:
    """The loop's iteration on `trajectories` from the same initial models every time, with
    an executor whose counters stand at `sandbox`; (metrics, the policy's and value model's
    weights before and after, the source's hooks run, PPO steps taken)."""
    seed(1234)  # the same initial weights for every call
    models = [build_gpt(MODEL, PrecisionConfig(), value=v) for v in (False, True, False)]
    before = [p.detach().clone() for m in models[:2] for p in m.parameters()]
    trainer = object.__new__(Trainer)
    trainer.cfg = SimpleNamespace(
        episodes=SimpleNamespace(max_turns=3),
        update=SimpleNamespace(num_minibatches=minibatches),
        rollout=SimpleNamespace(layout="colocated"),
    )
    trainer.rank = 0
    trainer.tokenizer = SimpleNamespace(pad_token_id=0)
    trainer.executor = SimpleNamespace(sandbox_errors=sandbox[0], worker_restarts=sandbox[1])
    trainer.sandbox_counts = SandboxCounts(trainer.executor)
    trainer.source = Source(trajectories)
    trainer.update = Counting(
        *models, PPOConfig(), OptimConfig(lr=1e-3, warmup_steps=1), micro_batch_tokens=64
    )
    Counting.steps = 0
    metrics = trainer.iteration(1)
    after = [p.detach().clone() for m in models[:2] for p in m.parameters()]
    return metrics, before, after, trainer.source.hooks, Counting.steps


def max_diff(x: list[torch.Tensor], y: list[torch.Tensor]) -> float:
    return max(float((a - b).abs().max()) for a, b in zip(x, y, strict=True))


def main() -> None:
    os.environ.setdefault("MASTER_PORT", "29547")
    init_process_groups(1, 1)
    a = trajectory(1, [(0, 6, 12), (12, 15, 22)], [-0.2, 1.0])
    b = trajectory(2, [(0, 5, 14)], [-1.0])
    # What a broken sandbox leaves: rewards 0 and -0.2, better than b's failure.
    errors = [
        trajectory(3, [(0, 7, 20)], [0.0]),
        trajectory(4, [(0, 4, 9), (9, 12, 30)], [-0.2, 0.0]),
    ]
    for e in errors:
        e.sandbox_error = True
    # One minibatch of [a, error, b, error] against one of [a, b]: the same update.
    metrics, before, with_errors, _, _ = iteration([a, errors[0], b, errors[1]], 1, (3, 2))
    _, _, without, _, _ = iteration([a, b], 1, (0, 0))
    # Two minibatches, [a, b] and [error, error]: the second has nothing to train on.
    _, _, split, _, steps = iteration([a, b, *errors], 2, (0, 0))
    out = {
        "mixed": {
            "max_diff": max_diff(with_errors, without),
            "moved": max_diff(with_errors, before),
            "metrics": metrics,
        },
        "empty_minibatch": {
            "finite": all(bool(torch.isfinite(w).all()) for w in split),
            "steps": steps,
        },
    }
    metrics, before, after, hooks, steps = iteration(errors, 1, (2, 2))
    out["all_errors"] = {
        "metrics": metrics,
        "steps": steps,
        "hooks": hooks,
        "moved": max_diff(after, before),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    from rlef_hpc import runtime

    runtime.setup()
    runtime.setup_megatron()
    main()
