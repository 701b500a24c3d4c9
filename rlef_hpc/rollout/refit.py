"""Refit: the trainer's policy weights, streamed out of megatron into the rollout engine.

Each parameter is gathered over tensor-parallel ranks (pipeline stages each yield their own
layers), renamed and split to the Hugging Face layout by the one shared mapping
(rlef_hpc.checkpoint.hf), and streamed into the engine in memory, one tensor at a time.
After a refit the engine's log-probs must equal the trainer's: `check_mismatch` compares them
on the same tokens and refuses to go on past a threshold, so that a wrong refit never trains
silently for hours.
"""

from __future__ import annotations

import torch


class RefitMismatchError(RuntimeError):
    """The engine's log-probs disagree with the trainer's beyond the configured threshold."""


def check_mismatch(
    trainer_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor, threshold: float
) -> dict[str, float]:
    """Mean and max |trainer - engine| log-prob over `mask`; raises past `threshold` (max)."""
    diff = (trainer_logp - engine_logp).abs()[mask]
    stats = {"mismatch_mean": float(diff.mean()), "mismatch_max": float(diff.max())}
    if not stats["mismatch_max"] <= threshold:  # NaN (a broken engine) fails too
        raise RefitMismatchError(
            f"engine and trainer log-probs differ by up to {stats['mismatch_max']:.3g} "
            f"(mean {stats['mismatch_mean']:.3g}) after the refit; the threshold is {threshold}"
        )
    return stats
