"""Refit from megatron into vLLM: the engine's log-probs equal the trainer's after it, sampled
tokens carry the log-probs of the temperature they were sampled at, and a wrong refit is
caught by the guard."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.helpers import (
    require,
    run_script,
    run_tool,
    save_random_llama,
    script,
    torchrun_command,
)

pytestmark = pytest.mark.multiprocess  # the scripts of tests/scripts/ (vLLM) and the tools


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> tuple[Path, Path]:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
        import vllm  # noqa: F401
    except ImportError as e:
        require(False, f"vLLM / torch not installed ({e}): pip install -e '.[cpu]'")
    from rlef_hpc.checkpoint.convert import import_hf  # noqa: F401 - imported by the tool
    from rlef_hpc.models.tokenizer import build_tokenizer

    hf = tmp_path_factory.mktemp("hf")
    tokenizer = build_tokenizer(["def f(x):\n    return x + 1\nprint(f(2))\n"] * 50, vocab_size=256)
    # head_dim 32 (vLLM's CPU attention supports it); 2 KV groups and an even vocabulary (the
    # tokenizer's, padded) so that tensor parallelism of 2 divides them.
    save_random_llama(
        hf,
        tokenizer,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=500000.0,
    )
    ckpt = tmp_path_factory.mktemp("ckpt")
    proc = run_tool("convert_from_hf.py", hf, ckpt)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return hf, ckpt


def test_refit_matches_sampling_logprobs_and_guard(model_dirs):
    hf, ckpt = model_dirs
    proc = run_script(script("refit_logprobs"), hf, ckpt)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = {line.split()[0]: line.split() for line in proc.stdout.splitlines() if line.strip()}
    assert float(lines["STALE"][1]) > 1e-2  # the weights did move: the check is not vacuous
    assert float(lines["STALE"][3]) <= 1e-4  # after the refit: the trainer's log-probs
    assert int(lines["SAMPLED"][1]) > 0 and float(lines["SAMPLED"][3]) <= 1e-4
    # Both broken refits (gate/up swapped, lm_head scaled) are caught, none missed.
    assert proc.stdout.count("CAUGHT:") == 2 and "NOT" not in lines


def test_one_ppo_step_at_tp2_then_refit_into_vllm_at_tp2(model_dirs, tmp_path):
    """Two processes: megatron and vLLM (external_launcher) both at TP=2, in the same ranks.
    The trained policy is also published for a standalone rollout worker: another process,
    its own vLLM at TP=1, which loads it and agrees with the trainer too."""
    hf, ckpt = model_dirs
    run = tmp_path / "run"
    cmd, env = torchrun_command(script("refit_tp2"), 2, hf, ckpt, run)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("TP2 STALE"))
    _, _, stale, _, refit = line.split()
    assert float(stale) > 1e-2 and float(refit) <= 1e-4
    assert sorted(p.name for p in (run / "weights").iterdir()) == ["latest", "v00000001"]
    proc = run_script(script("weight_follower"), hf, run)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("STANDALONE"))
    assert float(line.split()[1]) <= 1e-4


def sampling_run(hf: Path, seed: int) -> dict:
    import json

    proc = run_script(script("sampling_options"), hf, seed, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("JSON"))[4:])


def test_sampling_options_are_honoured(model_dirs):
    hf, _ = model_dirs
    first, again, other = sampling_run(hf, 3), sampling_run(hf, 3), sampling_run(hf, 4)
    assert all(0 < len(t) <= 6 for t in first["sampled"])  # max_tokens
    assert len({tuple(t) for t in first["sampled"]}) > 1  # temperature 1: samples differ
    assert again["sampled"] == first["sampled"] and other["sampled"] != first["sampled"]  # seeds
    assert first["stopped"] == [[first["eot"]]]  # stops at end of turn
    assert first["nucleus"][0] == first["nucleus"][1] == first["greedy"][0]  # top-p
