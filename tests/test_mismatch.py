"""The mismatch guards' statistic (mean and an exact high quantile of |trainer - engine|
log-prob, from counts) and both guards: healthy bf16 and FP8 engines with an outlier token
pass, broken refits fail."""

from __future__ import annotations

import pytest
import torch

from rlef_hpc.config import ConfigError, load
from rlef_hpc.mismatch import MismatchLimits, mismatch_stats, mismatch_violation
from rlef_hpc.rollout.refit import RefitMismatchError, check_batch_mismatch, check_mismatch
from rlef_hpc.train.config import TrainConfig

LIMITS = MismatchLimits()  # the shipped configs' limits


@pytest.mark.parametrize("n", [1, 2, 7, 33, 1000, 4097])
@pytest.mark.parametrize("q", [0.5, 0.9, 0.999, 1.0])
def test_the_count_above_the_limit_decides_exactly_the_lower_quantile(n, q):
    diff = torch.rand(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    ordered = diff.sort().values
    for limit in {float(ordered[k]) for k in (0, n // 2, n - 2, n - 1)} | {0.5}:
        limits = MismatchLimits(mean_limit=10.0, quantile=q, quantile_limit=limit)
        stats = mismatch_stats(diff, torch.zeros(n), torch.ones(n, dtype=torch.bool), limit)
        past = torch.quantile(diff, q, interpolation="lower") > limit
        assert (mismatch_violation(stats, limits) is not None) == bool(past), (limit, stats)


def peaked_model(tokens: int = 20000, hidden: int = 256, vocab: int = 1024):
    """Hidden states, an output projection and tokens sampled from it: confident predictions
    (logits of standard deviation ~3), as a trained model's, where precision matters most."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) * 3 / hidden**0.5
    sampled = torch.multinomial(torch.softmax(h @ w.T, -1), 1, generator=g).squeeze(1)
    return h, w, sampled


def logp(h: torch.Tensor, w: torch.Tensor, sampled: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax((h @ w.T).float(), -1).gather(1, sampled[:, None]).squeeze(1)


def fp8(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x through e4m3 with a scale per block of `rows` x 128 (FP8 rollouts: 128 x 128 for
    weights, 1 x 128 for activations), back in bf16."""
    n, cols = x.shape
    blocks = x.reshape(n // rows, rows, cols // 128, 128)
    scale = blocks.abs().amax(dim=(1, 3), keepdim=True) / torch.finfo(torch.float8_e4m3fn).max
    quantised = (blocks / scale).to(torch.float8_e4m3fn).to(torch.float32) * scale
    return quantised.reshape(n, cols).to(torch.bfloat16)


def both_guards(trainer: torch.Tensor, engine: torch.Tensor) -> dict[str, float]:
    """The refit probe's check and the per-batch guard (on the update's metrics) alike:
    raises RefitMismatchError past the shipped limits."""
    mask = torch.ones_like(trainer, dtype=torch.bool)
    stats = check_mismatch(trainer, engine, mask, LIMITS)
    check_batch_mismatch(mismatch_stats(trainer, engine, mask, LIMITS.quantile_limit), LIMITS, 1)
    return stats


@pytest.fixture(scope="module")
def model():
    return peaked_model()


@pytest.mark.parametrize("engine", ["bf16", "fp8"])
def test_healthy_engines_pass_with_an_outlier_token_that_a_max_guard_stops(model, engine):
    h, w, sampled = model
    trainer = logp(h, w, sampled)
    if engine == "bf16":  # measured: mean 0.011, p99.9 0.05 nats
        rollout = logp(h.bfloat16(), w.bfloat16(), sampled)
    else:  # weights and activations in FP8; measured: mean 0.08, p99.9 0.36 nats
        rollout = logp(fp8(h, 1), fp8(w, 128), sampled)
    rollout[123] -= 6.0  # one token far off, as a few of 10^5-10^6 are in healthy runs
    stats = both_guards(trainer, rollout)
    assert stats["mismatch_max"] > 0.5  # the old guard (max past 0.5) stopped this run
    assert 0 < stats["mismatch_mean"] < LIMITS.mean_limit / 2


@pytest.mark.parametrize("broken", ["permuted", "scaled", "partial"])
def test_broken_refits_fail_both_guards(model, broken):
    h, w, sampled = model
    trainer = logp(h, w, sampled)
    if broken == "permuted":  # two output rows exchanged throughout: names off by one
        rollout = logp(h.bfloat16(), w.roll(1, 0).bfloat16(), sampled)
    elif broken == "scaled":  # a weight scaled by a wrong factor
        rollout = logp(h.bfloat16(), (1.5 * w).bfloat16(), sampled)
    else:  # 1% of the tokens 3 nats off: the mean stays under its limit, the p99.9 does not
        rollout = logp(h.bfloat16(), w.bfloat16(), sampled)
        rollout[::100] -= 3.0
        mask = torch.ones_like(trainer, dtype=torch.bool)
        assert mismatch_stats(trainer, rollout, mask, 2.0)["mismatch_mean"] < LIMITS.mean_limit
    with pytest.raises(RefitMismatchError):
        check_mismatch(trainer, rollout, torch.ones_like(trainer, dtype=torch.bool), LIMITS)
    stats = mismatch_stats(trainer, rollout, torch.ones_like(trainer, dtype=torch.bool), 2.0)
    with pytest.raises(RefitMismatchError, match="iteration 7"):
        check_batch_mismatch(stats, LIMITS, 7)


def test_masked_tokens_count_and_nan_fails():
    trainer = torch.zeros(2, 4)
    engine = torch.tensor([[0.0, 9.0, 0.01, 0.0], [0.02, 0.0, float("nan"), 5.0]])
    mask = torch.tensor([[True, False, True, True], [True, True, False, False]])
    stats = mismatch_stats(trainer, engine, mask, 2.0)
    assert stats["mismatch_tokens"] == 5 and stats["mismatch_outliers"] == 0
    assert stats["mismatch_mean"] == pytest.approx(0.03 / 5, rel=1e-6)
    assert stats["mismatch_max"] == pytest.approx(0.02, rel=1e-6)
    with pytest.raises(RefitMismatchError, match="mean"):
        check_mismatch(trainer, engine, torch.ones_like(mask), LIMITS)
    check_batch_mismatch({"policy_grad_norm": 1.0}, LIMITS, 1)  # not the last stage: no stats


def test_limits_are_checked_where_the_config_names_them():
    cfg = load(TrainConfig, overrides=["rollout.mismatch.quantile_limit=3"])
    assert cfg.rollout.mismatch == MismatchLimits(quantile_limit=3.0)
    with pytest.raises(ConfigError, match=r"rollout.mismatch.*quantile=1.5"):
        load(TrainConfig, overrides=["rollout.mismatch.quantile=1.5"])


def test_the_refit_probe_limits_follow_the_precision():
    """fp32: a correct refit of the real model is ~1e-5 nats off, a stale tensor 4e-3 (max):
    the probe stops it; bf16 at its measured level; FP8 at the per-batch guard's."""
    from rlef_hpc.mismatch import refit_probe_limits
    from rlef_hpc.rollout.config import RolloutConfig
    from rlef_hpc.rollout.refit import probe_limits

    fp32 = refit_probe_limits("float32")
    assert (fp32.mean_limit, fp32.quantile, fp32.quantile_limit) == (1e-4, 1.0, 1e-3)
    trainer = torch.zeros(2, 88, dtype=torch.float64)
    mask = torch.ones_like(trainer, dtype=torch.bool)
    check_mismatch(trainer, trainer + 6e-5, mask, fp32)  # the measured correct level
    stale = trainer.clone()
    stale[0, 5] = 3.7e-3  # one token past the max: the stale tensor's level
    with pytest.raises(RefitMismatchError):
        check_mismatch(trainer, stale, mask, fp32)
    assert refit_probe_limits("bfloat16").quantile_limit == 2.0
    assert refit_probe_limits("bfloat16", "fp8") == MismatchLimits()
    assert probe_limits(RolloutConfig(), "float32") == fp32
    own = MismatchLimits(mean_limit=1.0)
    assert probe_limits(RolloutConfig(refit_mismatch=own), "float32") is own
