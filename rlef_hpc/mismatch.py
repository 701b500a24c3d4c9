"""Trainer vs engine log-probs: the statistics and limits of the mismatch guards (every batch's
sampled tokens, after the update; the probe sequences, after each refit).

The trainer and the engine run different kernels (the engine perhaps in FP8), so their
log-probs of a token are never equal, and across 10^5-10^6 bf16 tokens a few low-probability
ones differ by a nat or more in healthy runs: a guard on the max stops healthy runs. A broken
refit (weights permuted, misnamed, scaled) moves most tokens far. The guards bound instead
- the mean |trainer - engine| over the tokens, and
- a high quantile of it (p99.9 by default), which ignores a handful of outliers but catches
  damage confined to a minority of tokens that the mean dilutes (e.g. only positions past a
  RoPE-scaling boundary, or a few rows of the vocabulary);
the max is logged, not guarded.

The quantile over a batch spread over data-parallel ranks is exact and costs two numbers: the
q-quantile of n values (the "lower" one: a value of the sample, as numpy's and torch's
interpolation="lower") is at most `limit` exactly when at most n - 1 - floor(q (n - 1)) values
exceed `limit`. So each rank counts its tokens above the limit, and the counts and the token
counts are summed. With q = 1 that allows none: the max guard again (tests use it to demand
equality up to rounding).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class MismatchLimits:
    """Past either limit the run stops. The defaults are meant for trained models and were
    set on a simulation (tests/test_mismatch.py: a model with confident predictions, the
    log-probs of its own samples, its engine in bf16, or in FP8 e4m3 with blockwise scales for
    weights and activations), not on GPU runs (none was lent to this work): check the logged
    mismatch_* on the first one. (The CPU tests' random models predict nearly uniformly, so
    even a broken refit moves them by only 0.03-0.3 nats: they use fp32 on both sides and far
    tighter limits.)"""

    # nats: 2.5 times the mean of a simulated FP8 engine (weights and activations), 18 times
    # bf16's; a broken refit of a trained model is at nats
    mean_limit: float = 0.2
    quantile: float = 0.999  # which quantile of the per-token |difference| is bounded
    # nats (a factor e^2 = 7.4 in probability): at most 0.1% of the tokens may be further
    # off; simulated FP8's p99.9 is 0.36, bf16's 0.05
    quantile_limit: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.quantile <= 1:
            raise ValueError(f"quantile={self.quantile} must be in (0, 1]")
        if not (self.mean_limit > 0 and self.quantile_limit > 0):
            raise ValueError("mean_limit and quantile_limit must be positive")


# The refit probe's limits by precision. The probe runs the engine and the trainer on the same
# weights and the same tokens: only their kernels' numerics differ, so its limit is set by the
# precision, not by sampling noise, and a stale or swapped tensor stops the run at the refit
# that made it. Levels measured on SmolLM2-135M-Instruct (real weights) on CPU, vLLM's CPU build
# against megatron's local spec, the probe of 2 x 88 tokens, before and after 3 refits of a
# moved policy (benchmarks/refit_precision.py, 2 cores, 2026-12-06):
#   fp32, correct refits: mean 0.9e-5 - 1.2e-5, max 3.1e-5 - 6.2e-5 nats
#         one tensor left stale after one step: mean 5.6e-4, max 3.7e-3 (stops the run)
#         the tied output layer not sent (cf0390d): mean 5.1e-3, max 0.025 (stops the run)
#   bf16, correct refits: mean 0.059 - 0.067, max 0.26 - 0.57 nats; the broken refits above
#         measure the same (a step's change is below bf16's noise: only gross errors show)
# The limits are about 3 times the largest correct level (fp32: 10 times the mean, where a
# factor 3 would sit inside run-to-run spread on other hardware).
# FP8 (rollout.quantization=fp8, GPUs only) has no CPU measurement: its limits are the
# per-batch guard's (MismatchLimits' defaults, set on a simulated FP8 engine).
REFIT_PROBE_LIMITS = {
    "float32": (1e-4, 1e-3),
    "bfloat16": (0.2, 2.0),
    "float16": (0.2, 2.0),  # bf16's: fp16 keeps more mantissa, so at most bf16's differences
}


def refit_probe_limits(dtype: str, quantization: str = "none") -> MismatchLimits:
    """The refit probe's limits for a trainer and an engine in `dtype` (the engine quantised
    to FP8 or not): the mean, and the max (quantile 1: the probe is a few hundred tokens of
    the same weights, where no token may stray past the precision's level)."""
    if quantization != "none":
        return MismatchLimits()
    mean, top = REFIT_PROBE_LIMITS[dtype]
    return MismatchLimits(mean_limit=mean, quantile=1.0, quantile_limit=top)


def mismatch_stats(
    trainer_logp: torch.Tensor,
    engine_logp: torch.Tensor,
    mask: torch.Tensor,
    quantile_limit: float,
    group: Any = None,
) -> dict[str, float]:
    """|trainer - engine| over the tokens of `mask`, summed over `group`'s ranks when given:
    mismatch_mean, mismatch_max, mismatch_tokens (how many tokens) and mismatch_outliers (how
    many differ by more than `quantile_limit`; NaN counts as more)."""
    diff = (trainer_logp.double() - engine_logp.double()).abs()[mask]
    device = diff.device
    sums = torch.stack(
        [
            diff.sum(),
            (~(diff <= quantile_limit)).sum().double(),
            torch.tensor(float(diff.numel()), dtype=torch.float64, device=device),
        ]
    )
    top = diff.max() if diff.numel() else torch.zeros((), dtype=torch.float64, device=device)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(sums, group=group)
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    total, outliers, tokens = sums.tolist()
    return {
        "mismatch_mean": total / tokens if tokens else 0.0,
        "mismatch_max": float(top),
        "mismatch_tokens": tokens,
        "mismatch_outliers": outliers,
    }


def mismatch_violation(stats: Mapping[str, float], limits: MismatchLimits) -> str | None:
    """What in `stats` (from mismatch_stats, counted at limits.quantile_limit) is past the
    limits, in words; None when nothing is. A NaN mean (a broken engine) is past them."""
    tokens, outliers = int(stats["mismatch_tokens"]), int(stats["mismatch_outliers"])
    if tokens == 0:
        return None
    worst = f"(max {stats['mismatch_max']:.3g} nats, over {tokens} tokens)"
    if not stats["mismatch_mean"] <= limits.mean_limit:
        return (
            f"mean |trainer - engine| log-prob {stats['mismatch_mean']:.3g} nats is past "
            f"mean_limit={limits.mean_limit} {worst}"
        )
    allowed = tokens - 1 - math.floor(limits.quantile * (tokens - 1))
    if outliers > allowed:
        return (
            f"{outliers} of {tokens} tokens differ by more than quantile_limit="
            f"{limits.quantile_limit} nats: the {limits.quantile} quantile is past it "
            f"(at most {allowed} may be) {worst}"
        )
    return None
