"""Model configs: presets, HF config.json, and the checks that must fail before any process
group starts, naming the field; the CPU shim's scope."""

from __future__ import annotations

import pytest
import torch

from rlef_hpc.models import megatron_compat
from rlef_hpc.models.config import PRESETS, ModelConfig, ParallelConfig, PrecisionConfig, validate
from tests.helpers import run_script, script


def test_hf_llama_config():
    from transformers import LlamaConfig

    hf = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        max_position_embeddings=16384,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=5e5,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    cfg = ModelConfig.from_hf(hf.to_dict())
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers) == (300, 64, 3)
    assert (cfg.num_attention_heads, cfg.num_query_groups, cfg.ffn_hidden_size) == (4, 2, 96)
    assert cfg.rope_scaling and cfg.rope_theta == 5e5 and cfg.head_dim == 16
    bad = hf.to_dict()
    bad["rope_parameters"] = {**bad["rope_parameters"], "high_freq_factor": 2.0}
    with pytest.raises(
        ValueError, match="rope_scaling.high_freq_factor: megatron supports only 4.0"
    ):
        ModelConfig.from_hf(bad)
    with pytest.raises(ValueError, match="model_type: 'gpt2' is not supported"):
        ModelConfig.from_hf({**hf.to_dict(), "model_type": "gpt2"})


def test_presets_validate_at_their_layouts():
    validate(PRESETS["llama3_8b"], ParallelConfig(8, 1, 16), PrecisionConfig("bfloat16"))
    validate(
        PRESETS["llama3_70b"],
        ParallelConfig(8, 8, 16),
        PrecisionConfig("bfloat16", "hybrid"),
        (9, 0),
        transformer_engine=True,
    )
    assert PRESETS["llama3_70b"].num_layers == 80 and PRESETS["llama3_8b"].num_query_groups == 8


@pytest.mark.parametrize(
    ("model", "parallel", "precision", "capability", "message"),
    [
        (
            "llama3_8b",
            (3, 1, 1),
            (),
            None,
            "parallel.tensor=3 must divide model.num_attention_heads=32",
        ),
        (
            "llama3_8b",
            (16, 1, 1),
            (),
            None,
            "parallel.tensor=16 must divide model.num_query_groups=8",
        ),
        ("llama3_8b", (1, 5, 1), (), None, "parallel.pipeline=5 must divide model.num_layers=32"),
        ("tiny", (1, 1, 0), (), None, "parallel.data must be at least 1"),
        (
            "tiny",
            (1, 1, 1),
            ("bfloat16", "e4m3"),
            None,
            "precision.fp8 needs a GPU with compute capability >= 8.9; none found",
        ),
        (
            "tiny",
            (1, 1, 1),
            ("bfloat16", "e4m3"),
            (8, 0),
            "precision.fp8 needs compute capability >= 8.9, this GPU has (8, 0)",
        ),
        (
            "tiny",
            (1, 1, 1),
            ("bfloat16", "e4m3", "blockwise"),
            (8, 9),
            "precision.fp8_recipe=blockwise needs Hopper",
        ),
    ],
)
def test_bad_configs_name_the_field(model, parallel, precision, capability, message):
    """(A vocab TP cannot divide is checked too: see test_vocab_must_divide.)"""
    with pytest.raises(ValueError) as err:
        validate(PRESETS[model], ParallelConfig(*parallel), PrecisionConfig(*precision), capability)
    assert message in str(err.value)


def test_cpu_shim_is_a_noop_with_cuda(monkeypatch):
    import megatron.core.models.common.embeddings.rotary_pos_embedding as rope

    monkeypatch.setattr(megatron_compat, "_installed", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    before = rope.torch
    megatron_compat.install()
    assert rope.torch is before and megatron_compat._installed is False


def test_cpu_shim_refuses_other_megatron_versions(monkeypatch):
    import megatron.core

    monkeypatch.setattr(megatron_compat, "_installed", False)
    monkeypatch.setattr(megatron.core, "__version__", "0.99.0")
    with pytest.raises(
        RuntimeError, match="megatron-core 0.99.0 on CPU: the shims .* were written for 0.16.1"
    ):
        megatron_compat.install()


def test_fp8_is_refused_on_this_cpu_machine():
    from rlef_hpc.models.config import check

    with pytest.raises(
        ValueError, match="precision.fp8 needs a GPU with compute capability >= 8.9; none found"
    ):
        check(PRESETS["tiny"], ParallelConfig(), PrecisionConfig("bfloat16", "e4m3"), True)


def test_vocab_must_divide_by_tensor_parallel():
    odd = ModelConfig(
        vocab_size=255,
        hidden_size=64,
        num_layers=2,
        num_attention_heads=2,
        num_query_groups=2,
        ffn_hidden_size=128,
    )
    with pytest.raises(ValueError, match="parallel.tensor=2 must divide model.vocab_size=255"):
        validate(odd, ParallelConfig(2, 1, 1), PrecisionConfig())


@pytest.mark.multiprocess
def test_full_recomputation_changes_memory_not_numbers():
    """precision.recompute=full (what lets the 70B layout fit: tools/plan.py) recomputes each
    layer in backward: logits and gradients are those without it."""
    proc = run_script(script("recompute_compare"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RECOMPUTE"))
    _, _, logits, _, grads = line.split()
    assert float(logits) == 0.0 and float(grads) == 0.0
