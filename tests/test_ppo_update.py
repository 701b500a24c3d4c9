"""One PPO update under TP=2, PP=2, TP2xPP2 and DP=2 gives the losses and weights of TP=1, and
its micro-batches (sorted by length, cut by a token budget, each padded to its own longest row,
logits only where a response token is predicted) give those of one pass per minibatch over
every position's logits."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import run_script, script
from tests.helpers import torchrun as torchrun_script

SCRIPT = script("ppo_update")

pytestmark = pytest.mark.multiprocess  # tests/scripts/ppo_update.py under torchrun
# name: (tensor, pipeline, processes, whole minibatches)
LAYOUTS = {
    "tp1": (1, 1, 1, False),
    "tp2": (2, 1, 2, False),
    "pp2": (1, 2, 2, False),
    "tp2pp2": (2, 2, 4, False),
    "dp2": (1, 1, 2, False),
    "tp1_whole": (1, 1, 1, True),
    "pp2_whole": (1, 2, 2, True),
}
TOLERANCE = {"atol": 1e-5, "rtol": 1e-4}


def torchrun(nproc: int, *args: str) -> None:
    torchrun_script(SCRIPT, nproc, *args)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("ppo")
    init = tmp / "init.pt"
    torchrun(1, "--make-init", str(init))
    out = {}
    for name, (tp, pp, nproc, whole) in LAYOUTS.items():
        torchrun(
            nproc,
            *("--tp", tp, "--pp", pp, *(["--whole"] if whole else [])),
            *("--init", init, "--out", tmp / name),
        )
        stages = [torch.load(f"{tmp / name}.stage{s}") for s in range(pp)]
        merged = {"policy": {}, "value": {}, "metrics": stages[-1]["metrics"]}
        merged["rank0_metrics"] = stages[0]["metrics"]  # stage 0's file is global rank 0's
        for stage in stages:
            for model in ("policy", "value"):
                merged[model].update(stage["state"][model])
        out[name] = merged
    out["init"] = torch.load(init)
    return out


def assert_same_update(ref: dict, got: dict) -> None:
    for key in (
        "policy_loss",
        "value_loss",
        "clip_fraction",
        "approx_kl",
        "entropy",
        "is_weight",
        "kl",
        "explained_variance",
        "mismatch_mean",
        "mismatch_max",
        "mismatch_tokens",
        "mismatch_outliers",  # counted on each rank, summed: exact over data-parallel ranks
    ):
        assert got["metrics"][key] == pytest.approx(ref["metrics"][key], abs=1e-5), key
    for model in ("policy", "value"):
        assert got[model].keys() == ref[model].keys()
        for name, tensor in ref[model].items():
            torch.testing.assert_close(got[model][name], tensor, **TOLERANCE, msg=f"{model} {name}")


@pytest.mark.parametrize("layout", ["tp2", "pp2", "tp2pp2", "dp2"])
def test_layout_matches_tp1(results, layout):
    assert_same_update(results["tp1"], results[layout])


@pytest.mark.parametrize("layout", ["tp1", "pp2"])
def test_micro_batches_and_selected_logits_match_whole_minibatches(results, layout):
    """The same minibatches in micro-batches cut to their rows' lengths (tokens after a row's
    last response are never run), with logits at the response tokens only: the losses,
    metrics and updated weights of one pass per minibatch over every position's logits."""
    whole, cut = results[f"{layout}_whole"], results[layout]
    assert_same_update(whole, cut)
    assert cut["metrics"]["padding_fraction"] < whole["metrics"]["padding_fraction"]


@pytest.mark.parametrize("layout", ["pp2", "tp2pp2"])
def test_rank_0_has_the_last_stage_metrics(results, layout):
    """Losses, KL, entropy and mismatch are computed on the last pipeline stage; rank 0, a
    first stage, logs them."""
    rank0, last = results[layout]["rank0_metrics"], results[layout]["metrics"]
    per_stage = {"adam_numel", "param_numel"}  # the worker's own, of each stage's weights
    assert {"policy_loss", "value_loss", "kl", "entropy", "mismatch_max"} <= rank0.keys()
    assert {k: v for k, v in rank0.items() if k not in per_stage} == {
        k: v for k, v in last.items() if k not in per_stage
    }


def test_adam_state_is_sharded_over_data_parallel_ranks(results):
    tp1, dp2 = results["tp1"]["metrics"], results["dp2"]["metrics"]
    assert tp1["adam_numel"] == tp1["param_numel"]
    assert dp2["adam_numel"] == pytest.approx(tp1["param_numel"] / 2, rel=0.01)


def test_the_update_changed_the_weights(results):
    before, after = results["init"]["policy"], results["tp1"]["policy"]
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert len(changed) == len(before)  # every parameter of the policy moved
    metrics = results["tp1"]["metrics"]
    assert metrics["policy_grad_norm"] > 0 and metrics["value_grad_norm"] > 0
    assert (
        metrics["mismatch_max"] > 0 and torch.isfinite(torch.tensor(list(metrics.values()))).all()
    )


def logp_change(direction: float) -> tuple[float, float]:
    proc = run_script(SCRIPT, "--direction", direction, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("logp(X)"))
    before, after = (float(v) for v in line.split()[1::2])
    return before, after


def test_rewarded_answer_becomes_more_likely_and_punished_less():
    before, after = logp_change(+1.0)
    assert after > before + 1e-3
    before, after = logp_change(-1.0)
    assert after < before - 1e-3
