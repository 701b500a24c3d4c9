"""tools/plan.py: per-GPU memory of a layout, checked against what megatron really allocates
and against the published sizes of Llama 3.1; the shipped 8B and 70B layouts fit."""

from __future__ import annotations

import json
import subprocess

import pytest

from rlef_hpc.config import load
from rlef_hpc.launch.config import JobConfig
from rlef_hpc.launch.plan import GB, LLAMA_31, parameter_counts, plan, refit_cost
from tests.helpers import TESTS_DIR, run_tool, script, torchrun_command

CONFIGS = TESTS_DIR.parent / "configs"


def test_parameter_counts_are_llama_31s():
    # Meta's model cards: 8.03B and 70.6B parameters (untied input and output embeddings).
    for size, expected in (("8B", 8.03e9), ("70B", 70.55e9)):
        block, embedding = parameter_counts(LLAMA_31[size])
        assert block + 2 * embedding == pytest.approx(expected, rel=1e-3)


@pytest.mark.multiprocess
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_training_memory_per_gpu_is_what_megatron_allocates(tmp_path, dtype):
    """Weights, the fp32 gradient buffer, fp32 master weights and Adam's moments sharded over
    DP=2, as megatron's DDP and distributed optimizer hold them on one rank."""
    out = tmp_path / "memory.json"
    cmd, env = torchrun_command(script("memory_measure"), 2, out, dtype)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads(out.read_text())
    cfg = load(
        JobConfig,
        None,
        [
            "model.tokenizer_vocab=512",
            "model.hidden_size=128",
            "model.num_layers=3",
            "model.num_attention_heads=4",
            "model.num_query_groups=2",
            "model.ffn_hidden_size=352",
            "parallel.data=2",
            f"precision.dtype={dtype}",
            "rollout.rollouts_per_iteration=64",
        ],
    )
    block, embedding = parameter_counts(cfg.model.scratch_config(512))
    assert block + 2 * embedding == measured["parameters"]
    allocated = sum(measured[k] for k in ("weight_bytes", "grad_buffer_bytes"))
    allocated += measured["master_bytes"] + measured["moment_bytes"]
    planned = plan(cfg).trainer["policy weights + grads + optimizer"]
    # Megatron keeps the RMSNorm weights in fp32 even in bf16: a few hundred bytes here.
    assert planned == pytest.approx(allocated, rel=2e-3)


def test_shipped_8b_and_70b_layouts_fit_80gb_gpus():
    for name in ("llama3_8b", "llama3_70b"):
        report = plan(load(JobConfig, CONFIGS / f"{name}.yaml"))
        assert report.fits, (name, report.table())
        assert report.trainer_peak < 80 * GB
        assert report.kv_tokens > 3 * 9216  # a few longest episodes of KV cache per engine


def test_a_layout_that_does_not_fit_is_refused_naming_the_term_and_the_knob():
    cfg = load(JobConfig, CONFIGS / "llama3_70b.yaml", ["precision.recompute=null"])
    report = plan(cfg)
    assert not report.fits
    assert "activations" in report.refusal() and "precision.recompute=full" in report.refusal()
    cfg = load(
        JobConfig,
        CONFIGS / "llama3_70b.yaml",
        ["parallel.tensor=1", "parallel.pipeline=1", "parallel.data=32", "slurm.nodes=4"],
    )
    refusal = plan(cfg).refusal()
    assert "policy weights + grads + optimizer" in refusal and "parallel.tensor" in refusal


def test_plan_tool_prints_the_70b_table():
    proc = run_tool("plan.py", CONFIGS / "llama3_70b.yaml")
    assert proc.returncode == 0, proc.stderr
    for term in ("policy weights + grads + optimizer", "reference policy", "activations"):
        assert term in proc.stdout
    assert "TP 8 x PP 4 x DP 32" in proc.stdout and "fits" in proc.stdout
    bad = run_tool("plan.py", CONFIGS / "llama3_70b.yaml", "precision.recompute=null")
    assert bad.returncode == 1 and "DOES NOT FIT" in bad.stdout


def test_plan_tool_refuses_a_colocated_tensor_parallel_layout_with_exit_2():
    proc = run_tool("plan.py", CONFIGS / "demo_cpu.yaml", "parallel.tensor=2")
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout
    assert proc.stderr.startswith("plan: error:") and proc.stderr.count("\n") == 1, proc.stderr
    for key in ("parallel.tensor=2", "parallel.pipeline", "rollout.layout=colocated"):
        assert key in proc.stderr, proc.stderr


def test_bytes_per_parameter_are_megatrons_report():
    """megatron's theoretical memory report counts 6 + 12/DP bytes per parameter with the
    distributed optimizer in bf16 (2 weights + 4 fp32 grads + 12 Adam, sharded)."""
    from rlef_hpc.launch.plan import shard_parameters

    cfg = load(JobConfig, CONFIGS / "llama3_70b.yaml")
    report = plan(cfg)
    n = shard_parameters(LLAMA_31["70B"], cfg.parallel.tensor, cfg.parallel.pipeline)
    per_param = report.trainer["policy weights + grads + optimizer"] / n
    assert per_param == pytest.approx(6 + 12 / cfg.parallel.data)
    assert report.trainer["reference policy (frozen)"] / n == pytest.approx(2)


def test_fp8_rollouts_hold_linear_weights_in_one_byte():
    """The engine's weights with rollout.quantization=fp8: the linear layers' parameters (as
    transformers' Llama 3.1 70B counts them, on the meta device) in one byte each, the
    embedding and LM head in bf16."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = load(JobConfig, CONFIGS / "llama3_70b.yaml", [])
    bf16 = plan(cfg).rollout["vLLM weights"]
    fp8 = plan(load(JobConfig, CONFIGS / "llama3_70b.yaml", ["rollout.quantization=fp8"]))
    mc = LLAMA_31["70B"]
    hf = LlamaConfig(
        vocab_size=mc.vocab_size,
        hidden_size=mc.hidden_size,
        intermediate_size=mc.ffn_hidden_size,
        num_hidden_layers=mc.num_layers,
        num_attention_heads=mc.num_attention_heads,
        num_key_value_heads=mc.num_query_groups,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(hf)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    linear -= model.lm_head.weight.numel()
    total = sum(p.numel() for p in model.parameters())
    tp = cfg.rollout.tensor_parallel
    assert bf16 == pytest.approx(2 * total / tp, rel=1e-4)
    assert fp8.rollout["vLLM weights"] == pytest.approx((linear + 2 * (total - linear)) / tp, 1e-4)
    assert fp8.kv_tokens > plan(cfg).kv_tokens


def test_the_refit_cost_of_the_70b_layout_by_either_transport():
    """Issue 18: the planner prices a refit by the bus and by the files (the 70B paper
    layout: 32 workers, PP 4, bf16), from the documented link rates, against the step."""
    cfg = load(JobConfig, CONFIGS / "llama3_70b.yaml")
    refit = refit_cost(cfg, LLAMA_31["70B"])
    size = 70.55e9 * 2  # bf16 bytes of Llama-3.1-70B (untied embeddings)
    assert refit.weight_bytes == pytest.approx(size, rel=1e-3)
    assert refit.bus_s == pytest.approx(size / 50e9, rel=1e-3)  # one NDR link per GPU
    # The stage writers at 5 GB/s each, then 32 workers reading 141 GB at 100 GB/s in all.
    assert refit.files_s == pytest.approx(size / 4 / 5e9 + 32 * size / 100e9, rel=1e-3)
    step = 20 * 70.55e9 * 1024 * 9216 / 2 / (1024 * 989e12 * 0.35)
    assert refit.step_s == pytest.approx(step, rel=1e-3)
    assert refit.bus_s < 10 < refit.files_s  # the 10 s goal, and why the bus
    out = run_tool("plan.py", CONFIGS / "llama3_70b.yaml")
    assert f"| weight bus | {refit.bus_s:.1f} | {refit.share(refit.bus_s):.0%} |" in out.stdout


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_parameter_counts_are_each_familys(family):
    """Counted as transformers builds the family (Qwen3: head_dim apart from hidden / heads)."""
    from transformers import AutoModelForCausalLM

    from rlef_hpc.launch.plan import parameter_counts
    from rlef_hpc.models.config import ModelConfig
    from tests.helpers import random_config

    for tied in (True, False):
        config = random_config(
            family,
            hidden_size=96,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            tie_word_embeddings=tied,
        )
        block, embedding = parameter_counts(ModelConfig.from_hf(config.to_dict()))
        built = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
        assert block + embedding * (1 if tied else 2) == built


def test_released_shapes_have_their_published_sizes():
    from rlef_hpc.launch.plan import KNOWN_SHAPES, parameter_counts

    def billions(name: str) -> float:
        block, embedding = parameter_counts(KNOWN_SHAPES[name])
        return (block + embedding * (1 if KNOWN_SHAPES[name].tie_embeddings else 2)) / 1e9

    # the sizes their model cards state
    sizes = {"Llama-3.2-1B": 1.24, "Qwen2.5-0.5B": 0.49, "Qwen2.5-7B": 7.62, "Qwen3-0.6B": 0.6}
    for name, size in sizes.items():
        assert abs(billions(name) - size) / size < 0.02, (name, billions(name))


def test_fp32_activations_are_twice_bf16s():
    """The activation formula's bytes are 16-bit activations'; fp32 training holds 4 bytes each
    (the fp32 logits and the token ids are the same either way)."""
    overrides = ["update.batching=padded", "update.micro_batch_size=2"]

    def activations(dtype: str) -> float:
        return plan(load(JobConfig, None, [*overrides, f"precision.dtype={dtype}"])).trainer[
            "activations"
        ]

    job = load(JobConfig, None, overrides)
    seq = job.episodes.max_turns * (job.rollout.max_tokens + 1024)
    same = seq * 2 * (job.model.tokenizer_vocab * 4 + 8)  # logits (fp32) and token ids
    assert activations("float32") - same == pytest.approx(2 * (activations("bfloat16") - same))
