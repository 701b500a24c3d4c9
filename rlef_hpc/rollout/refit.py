"""Refit: the trainer's policy weights, streamed out of megatron into the rollout engine.

Each parameter is gathered over tensor-parallel ranks (pipeline stages each yield their own
layers), renamed and split to the Hugging Face layout by the one shared mapping
(rlef_hpc.checkpoint.hf), and streamed into the engine in memory, one tensor at a time.
After a refit the engine's log-probs must equal the trainer's up to kernels and precision:
`check_mismatch` compares them on the same tokens and refuses to go on past the limits of the
precision (`probe_limits`: the mean and the max, at the levels a correct refit of a real model
reaches), so that a wrong refit stops the run at the refit that made it.
`check_batch_mismatch` applies rollout.mismatch's limits (sampling noise) to every batch's
sampled tokens, from the update's metrics.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from rlef_hpc.mismatch import (
    MismatchLimits,
    mismatch_stats,
    mismatch_violation,
    refit_probe_limits,
)
from rlef_hpc.rollout.config import RolloutConfig


class RefitMismatchError(RuntimeError):
    """The engine's log-probs disagree with the trainer's beyond the configured limits."""


def check_mismatch(
    trainer_logp: torch.Tensor,
    engine_logp: torch.Tensor,
    mask: torch.Tensor,
    limits: MismatchLimits,
) -> dict[str, float]:
    """The refit probe: mismatch_stats of |trainer - engine| log-prob over `mask`; raises
    past `limits`."""
    stats = mismatch_stats(trainer_logp, engine_logp, mask, limits.quantile_limit)
    problem = mismatch_violation(stats, limits)
    if problem is not None:
        raise RefitMismatchError(f"engine and trainer log-probs after the refit: {problem}")
    return stats


def check_batch_mismatch(
    metrics: Mapping[str, float], limits: MismatchLimits, iteration: int
) -> None:
    """The per-batch guard: the update's mismatch_* metrics (its pi_old against the engine's
    sampling log-probs, over every sampled token of the batch, counted at
    limits.quantile_limit) against `limits`. Ranks without them (not the last pipeline stage)
    pass."""
    if "mismatch_tokens" not in metrics:
        return
    problem = mismatch_violation(metrics, limits)
    if problem is not None:
        raise RefitMismatchError(
            f"iteration {iteration}: trainer and engine log-probs of the sampled tokens: "
            f"{problem} (rollout.mismatch)"
        )


def probe_limits(rollout: RolloutConfig, dtype: str) -> MismatchLimits:
    """The refit probe's limits: rollout.refit_mismatch where the config sets them, else the
    precision's (rlef_hpc.mismatch.refit_probe_limits), far tighter than the per-batch guard's
    (rollout.mismatch), which bound sampling noise over a batch of sampled tokens."""
    if rollout.refit_mismatch is not None:
        return rollout.refit_mismatch
    return refit_probe_limits(dtype, rollout.quantization)
