"""Core attention alone, forward + backward: megatron's unfused DotProductAttention (the T x T
scores, masked softmax and context as separate ops) against SDPAttention (one
scaled_dot_product_attention call), causal, batch 1, in the same process and run.

    python benchmarks/attention_bench.py [--seq 512 1024 2048] [--heads 32] [--groups 8]
        [--head-dim 128] [--dtype float32] [--repeats 5]

Each row: the median over --repeats of one forward + backward (after one warm-up), the two
modules timed alternately so that load from elsewhere falls on both; and the largest output
difference between them, so that a speed-up is never one of a wrong answer.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist


def setup() -> None:
    """One gloo rank: megatron's attention reads its tensor-parallel group, its global memory
    buffer (for the scores) and its RNG tracker (for dropout, even at 0)."""
    from megatron.core import parallel_state as ps

    from rlef_hpc.models.megatron_compat import seed

    os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1")
    os.environ.setdefault("MASTER_PORT", "29599")
    dist.init_process_group("gloo")
    ps.initialize_model_parallel(1, 1)
    seed(0)


def modules(heads: int, groups: int, head_dim: int, dtype: torch.dtype) -> dict:
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from rlef_hpc.models.attention import SDPAttention

    config = TransformerConfig(
        num_layers=1,
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=head_dim,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
    )
    causal = AttnMaskType.causal
    return {
        "megatron unfused": DotProductAttention(config, 1, causal, "self"),
        "SDPA": SDPAttention(config, 1, causal, "self"),
    }


def step(module: torch.nn.Module, q, k, v, mask, upstream) -> tuple[float, torch.Tensor]:
    """Seconds for one forward + backward, and the output."""
    qkv = [t.detach().requires_grad_() for t in (q, k, v)]
    start = time.perf_counter()
    out = module(*qkv, mask)
    (out * upstream).sum().backward()
    return time.perf_counter() - start, out.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from rlef_hpc.models.gpt import causal_mask

    setup()
    dtype = getattr(torch, args.dtype)
    mods = modules(args.heads, args.groups, args.head_dim, dtype)
    print(
        f"batch 1, {args.heads} heads, {args.groups} query groups, head dim {args.head_dim}, "
        f"{args.dtype}, causal, {torch.get_num_threads()} threads, forward + backward, "
        f"median of {args.repeats}\n"
    )
    print("| T | megatron unfused s | SDPA s | speed-up | max abs diff |")
    print("|---|---|---|---|---|")
    for seq in args.seq:
        g = torch.Generator().manual_seed(seq)
        q = torch.randn(seq, 1, args.heads, args.head_dim, generator=g).to(dtype)
        k, v = (
            torch.randn(seq, 1, args.groups, args.head_dim, generator=g).to(dtype) for _ in range(2)
        )
        upstream = torch.randn(seq, 1, args.heads * args.head_dim, generator=g).to(dtype)
        mask = causal_mask(seq)
        times: dict[str, list[float]] = {name: [] for name in mods}
        outs = {}
        for rep in range(args.repeats + 1):  # the first: warm-up, not counted
            for name, module in mods.items():
                seconds, outs[name] = step(module, q, k, v, mask, upstream)
                if rep:
                    times[name].append(seconds)
        base, sdpa = (statistics.median(times[name]) for name in mods)
        diff = (outs["SDPA"].float() - outs["megatron unfused"].float()).abs().max().item()
        print(f"| {seq} | {base:.3f} | {sdpa:.3f} | {base / sdpa:.1f}x | {diff:.2g} |", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    from rlef_hpc import runtime

    runtime.setup()
    runtime.setup_megatron()
    main()
