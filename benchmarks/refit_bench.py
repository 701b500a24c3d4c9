"""Refit and generation on CPU, side by side in one run.

    python benchmarks/refit_bench.py [--hidden 2048 --layers 16]   (~1B parameters)

Refit: the megatron policy's weights into the vLLM engine, (a) streamed in memory through the
shared mapping (what the trainer does), against (b) writing a Hugging Face directory and
reloading the engine from it. (vLLM's CPU in-place reload takes all weights in one pass, so
"bucketed" and "tensor by tensor" are the same thing here.) Generation: the engine's tokens/s
against transformers' `generate` on the same model and prompts.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from random_llama import random_llama

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    args = p.parse_args()
    from rlef_hpc.checkpoint.convert import import_hf, load_model_checkpoint
    from rlef_hpc.checkpoint.hf_dir import hf_weights
    from rlef_hpc.dist_env import init_process_groups
    from rlef_hpc.rollout.vllm_engine import SamplingConfig, VLLMGenerator

    tmp = Path(tempfile.mkdtemp(prefix="refit-bench-"))
    hf, tokenizer = random_llama(args.hidden, args.layers)
    params = sum(t.numel() for t in hf.parameters())
    hf.save_pretrained(tmp / "hf")
    tokenizer.save_pretrained(tmp / "hf")
    import_hf(tmp / "hf", tmp / "ckpt", value_model=False)
    init_process_groups()
    policy, cfg, _ = load_model_checkpoint(tmp / "ckpt", "policy")
    sampling = SamplingConfig(
        temperature=1.0, max_tokens=args.new_tokens, extra={"ignore_eos": True}
    )
    engine = VLLMGenerator(str(tmp / "hf"), sampling, kv_cache_gib=2.0)
    size_gb = params * 4 / 1e9

    start = time.perf_counter()
    engine.update_weights(hf_weights(policy, cfg))
    streamed = time.perf_counter() - start

    start = time.perf_counter()
    from rlef_hpc.checkpoint.convert import export_hf

    export_hf(tmp / "ckpt", tmp / "published")
    engine.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(tmp / "published")})
    engine.llm.reset_prefix_cache()
    via_disk = time.perf_counter() - start

    prompts = [[(7 * i + j) % 500 + 1 for j in range(16)] for i in range(args.prompts)]
    start = time.perf_counter()
    out = engine(prompts)
    engine_tps = sum(len(g.tokens) for g in out) / (time.perf_counter() - start)
    start = time.perf_counter()
    with torch.no_grad():
        generated = hf.generate(
            torch.tensor(prompts),
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            do_sample=True,
        )
    hf_tps = (generated.shape[1] - 16) * len(prompts) / (time.perf_counter() - start)

    print(
        f"model: {params / 1e9:.2f}B parameters, fp32 ({size_gb:.1f} GB); {os.cpu_count()} cores\n"
    )
    print("| refit | seconds | GB/s |")
    print("|---|---|---|")
    print(f"| streamed in memory (trainer -> engine) | {streamed:.2f} | {size_gb / streamed:.2f} |")
    print(f"| export to disk, engine reloads from it | {via_disk:.2f} | {size_gb / via_disk:.2f} |")
    print(f"\n| generation ({args.prompts} prompts x {args.new_tokens} tokens) | tokens/s |")
    print("|---|---|")
    print(f"| vLLM (CPU) | {engine_tps:.1f} |")
    print(f"| transformers generate | {hf_tps:.1f} |")


if __name__ == "__main__":
    from rlef_hpc import runtime

    runtime.setup()
    runtime.setup_megatron()
    main()
