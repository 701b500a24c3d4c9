"""Core attention: the spec picks SDPA where Transformer Engine is absent, TE's where it is;
SDPAttention equals megatron's DotProductAttention (forward and backward, fp32, 1e-5) at TP1
and TP2, and a whole GPTModel with it equals one with megatron's local spec unmodified."""

from __future__ import annotations

import re
import subprocess
from types import SimpleNamespace

import pytest
import torch

from tests.helpers import script, torchrun_command


def core_attention(spec) -> type:
    return spec.submodules.self_attention.submodules.core_attention


def test_the_spec_decides_the_attention(monkeypatch):
    """SDPA wherever the local spec is used (CPU, CUDA without TE); TE's spec untouched."""
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from rlef_hpc.models.attention import SDPAttention
    from rlef_hpc.models.config import PRESETS
    from rlef_hpc.models.gpt import Kernels, layer_spec

    tiny = PRESETS["tiny"]
    assert core_attention(gpt_layer_specs.get_gpt_layer_local_spec()) is DotProductAttention
    assert core_attention(layer_spec(tiny, Kernels())) is SDPAttention
    assert core_attention(layer_spec(tiny, Kernels(cuda=True, apex=True))) is SDPAttention
    # TE's spec cannot be built without TE installed: a stand-in shows it is returned as is.
    te_spec = object()
    monkeypatch.setattr(
        gpt_layer_specs, "get_gpt_layer_with_transformer_engine_spec", lambda **_: te_spec
    )
    assert layer_spec(tiny, Kernels(cuda=True, te=True)) is te_spec


def sdpa(heads: int, groups: int, **config_fields) -> torch.nn.Module:
    """An SDPAttention outside any process group (one tensor-parallel rank)."""
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from rlef_hpc.models.attention import SDPAttention

    config = TransformerConfig(
        num_layers=2,
        hidden_size=heads * 8,
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=8,
        use_cpu_initialization=True,
        **{"attention_dropout": 0.0, **config_fields},
    )
    tp1 = SimpleNamespace(tp=SimpleNamespace(size=lambda: 1))
    return SDPAttention(config, 1, AttnMaskType.causal, "self", pg_collection=tp1)


def test_sdpa_attention_is_causal_grouped_scaled_attention():
    """Against attention written out: scores / sqrt(hn), causal, query head i on group
    i // (heads / groups); inputs [s, b, n, hn], output [s, b, n * hn]."""
    from rlef_hpc.models.gpt import causal_mask

    seq, b, heads, groups, hn = 9, 2, 4, 2, 8
    g = torch.Generator().manual_seed(0)
    q = torch.randn(seq, b, heads, hn, generator=g)
    k, v = (torch.randn(seq, b, groups, hn, generator=g) for _ in range(2))
    out = sdpa(heads, groups)(q, k, v, causal_mask(seq))
    kk, vv = (t.repeat_interleave(heads // groups, dim=2) for t in (k, v))
    scores = torch.einsum("sbnd,tbnd->bnst", q, kk) / hn**0.5
    scores = scores.masked_fill(causal_mask(seq), float("-inf"))
    expected = torch.einsum("bnst,tbnd->sbnd", scores.softmax(-1), vv).reshape(seq, b, -1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_sdpa_attention_refuses_dropout():
    with pytest.raises(ValueError, match="attention_dropout=0 only, got 0.1"):
        sdpa(4, 2, attention_dropout=0.1)


CASES = (
    "gqa",
    "mha",
    "gqa4to1",
    "no_mask_given",
    "softmax_scale",
    "layer_scaling",
    "padding_mask",
)


@pytest.mark.multiprocess
@pytest.mark.parametrize("tp", [1, 2])
def test_sdpa_equals_megatron_dot_product_attention(tp):
    """tests/scripts/attention_compare.py under torchrun: per case (GQA 2:1 and 4:1, MHA,
    explicit softmax scale, query-key layer scaling, causal with and without the mask tensor,
    a padding mask) the output and the gradients of q, k and v; then a GPTModel's logits and
    parameter gradients, relative to their largest magnitude."""
    cmd, env = torchrun_command(script("attention_compare"), tp)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    found = {}
    for line in proc.stdout.splitlines():
        if m := re.match(r"ATTN (\w+) out (\S+) dq (\S+) dk (\S+) dv (\S+)$", line):
            found[m[1]] = [float(x) for x in m.groups()[1:]]
        elif m := re.match(r"GPT logits (\S+) grads (\S+)$", line):
            found["gpt"] = [float(m[1]), float(m[2])]
    assert set(found) == {*CASES, "gpt"}, proc.stdout
    worst = {name: max(diffs) for name, diffs in found.items()}
    assert all(d < 1e-5 for d in worst.values()), worst
