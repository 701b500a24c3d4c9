"""SDPAttention against megatron's DotProductAttention on this rank's heads, forward and
backward, then a whole GPTModel built with the local spec as shipped (SDPA) against one built
with megatron's unmodified local spec, at the same weights; at the tensor-parallel size of the
launch (run by torchrun from tests/test_attention.py). Rank 0 prints one line per
comparison, the largest over the ranks:

    ATTN <case> out <d> dq <d> dk <d> dv <d>      (largest absolute differences)
    GPT logits <r> grads <r>                      (largest differences over largest magnitude)

torchrun --nproc-per-node {1,2} tests/scripts/attention_compare.py
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# (name, heads, query groups, extra TransformerConfig fields, mask type, mask)
CASES = [
    ("gqa", 4, 2, {}, "causal", "causal"),
    ("mha", 4, 4, {}, "causal", "causal"),
    ("gqa4to1", 8, 2, {}, "causal", "causal"),
    ("no_mask_given", 4, 2, {}, "causal", None),
    ("softmax_scale", 4, 2, {"softmax_scale": 0.3}, "causal", "causal"),
    ("layer_scaling", 4, 2, {"apply_query_key_layer_scaling": True}, "causal", "causal"),
    ("padding_mask", 4, 2, {}, "padding", "random"),
]
SEQ, BATCH, HEAD_DIM = 33, 2, 8


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def relative_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return max_diff(a, b) / b.abs().max().item()


def compare_core(
    name: str, heads: int, groups: int, extra: dict, mask_type: str, mask_kind: str | None
) -> tuple[str, list[float]]:
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from rlef_hpc.models.attention import SDPAttention
    from rlef_hpc.models.gpt import causal_mask

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    config = TransformerConfig(
        num_layers=4,
        hidden_size=heads * HEAD_DIM,
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=HEAD_DIM,
        tensor_model_parallel_size=tp,
        use_cpu_initialization=True,
        attention_dropout=0.0,
        **extra,
    )
    kind = AttnMaskType[mask_type]
    # Layer 3: apply_query_key_layer_scaling divides by the layer number, so 1 would hide it.
    # softmax_scale as megatron's Attention passes it (the module ignores config's own).
    modules = [
        cls(config, 3, kind, "self", softmax_scale=config.softmax_scale)
        for cls in (DotProductAttention, SDPAttention)
    ]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(SEQ, BATCH, heads, HEAD_DIM, generator=g)
    k = torch.randn(SEQ, BATCH, groups, HEAD_DIM, generator=g)
    v = torch.randn(SEQ, BATCH, groups, HEAD_DIM, generator=g)
    upstream = torch.randn(SEQ, BATCH, heads // tp * HEAD_DIM, generator=g)
    if mask_kind == "causal":
        mask = causal_mask(SEQ)
    elif mask_kind == "random":
        # Megatron's convention (True = masked out), per sequence; the diagonal kept so that
        # no query has nothing to attend to (there the two softmaxes differ by design).
        mask = torch.rand(BATCH, 1, SEQ, SEQ, generator=g) < 0.4
        mask &= ~torch.eye(SEQ, dtype=torch.bool)
    else:
        mask = None
    # This rank's heads and groups, as the QKV projection's partition hands them over.
    h, n = heads // tp, groups // tp
    local = (q[:, :, rank * h : (rank + 1) * h], k[:, :, rank * n : (rank + 1) * n])
    local += (v[:, :, rank * n : (rank + 1) * n],)
    results = []
    for module in modules:
        qkv = [t.clone().requires_grad_() for t in local]
        out = module(*qkv, mask)
        (out * upstream).sum().backward()
        results.append((out.detach(), *(t.grad for t in qkv)))
    (ref, *ref_grads), (out, *grads) = results
    assert out.shape == ref.shape == (SEQ, BATCH, h * HEAD_DIM), (out.shape, ref.shape)
    diffs = [max_diff(out, ref)] + [max_diff(a, b) for a, b in zip(grads, ref_grads, strict=True)]
    return "ATTN " + name + " out {:.3g} dq {:.3g} dk {:.3g} dv {:.3g}", diffs


def compare_gpt() -> tuple[str, list[float]]:
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from rlef_hpc.models.attention import SDPAttention
    from rlef_hpc.models.config import ModelConfig, PrecisionConfig
    from rlef_hpc.models.gpt import build_gpt, causal_mask
    from rlef_hpc.models.megatron_compat import seed

    shape = ModelConfig(
        vocab_size=64,
        hidden_size=32,
        num_layers=2,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=64,
        max_position_embeddings=128,
    )
    seed(0)
    new = build_gpt(shape, PrecisionConfig())
    cores = [layer.self_attention.core_attention for layer in new.decoder.layers]
    assert all(type(c) is SDPAttention for c in cores), [type(c) for c in cores]
    old = GPTModel(
        config=new.config,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=shape.vocab_size,
        max_sequence_length=shape.max_position_embeddings,
        parallel_output=True,
        share_embeddings_and_output_weights=shape.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(shape.rope_theta),
    )
    old.load_state_dict(new.state_dict())
    seq = 24
    x = torch.randint(0, 64, (2, seq), generator=torch.Generator().manual_seed(1))
    results = []
    for model in (old, new):
        logits = model(x, torch.arange(seq).expand(2, -1), causal_mask(seq))
        logits.pow(2).mean().backward()
        results.append((logits.detach(), [p.grad for p in model.parameters()]))
    (ref, ref_grads), (logits, grads) = results
    # Relative to the largest magnitude: a tiny model's logits and gradients are small
    # (initialisation std 0.02), where absolute differences would say little.
    grad_diff = max(relative_diff(a, b) for a, b in zip(grads, ref_grads, strict=True))
    return "GPT logits {:.3g} grads {:.3g}", [relative_diff(logits, ref), grad_diff]


def main() -> None:
    from megatron.core import parallel_state as ps

    from rlef_hpc.models.megatron_compat import seed

    dist.init_process_group("gloo")
    ps.initialize_model_parallel(dist.get_world_size(), 1)
    seed(0)  # megatron's attention forks its model-parallel RNG tracker (for dropout)
    lines = [compare_core(*case) for case in CASES] + [compare_gpt()]
    # Each rank compares its own heads and shards; rank 0 prints the largest over the ranks.
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, [diffs for _, diffs in lines])
    if dist.get_rank() == 0:
        for i, (template, _) in enumerate(lines):
            worst = [max(rank[i][j] for rank in every) for j in range(len(every[0][i]))]
            print(template.format(*worst), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    from rlef_hpc import runtime

    runtime.setup()
    runtime.setup_megatron()
    main()
