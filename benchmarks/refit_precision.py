"""The refit probe's levels on the real model (SmolLM2-135M-Instruct, tools/fetch_real_model.py)
on CPU: trainer (megatron) vs engine (vLLM) log-probs on the probe sequences, before any refit
and after each of a few refits of a moved policy, in one precision; beside them what the probe
sees after broken refits (one tensor left stale; the tied output layer not sent, as before
the fix). The limits in rlef_hpc.mismatch.REFIT_PROBE_LIMITS are set from these levels.

    python benchmarks/refit_precision.py --dtype float32|bfloat16 [--refits 3]
"""

from __future__ import annotations

import argparse
import os

import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--refits", type=int, default=3)
    args = p.parse_args()
    from transformers import AutoTokenizer

    from rlef_hpc.checkpoint.gguf import real_model_dir
    from rlef_hpc.checkpoint.hf_dir import (
        build_from_hf,
        engine_weights,
        hf_weights,
        read_model_config,
    )
    from rlef_hpc.data.bundled import BUNDLED
    from rlef_hpc.data.codecontests import load_problems
    from rlef_hpc.dist_env import init_process_groups
    from rlef_hpc.episodes.runner import EpisodeConfig
    from rlef_hpc.mismatch import mismatch_stats, refit_probe_limits
    from rlef_hpc.models.config import PrecisionConfig
    from rlef_hpc.models.gpt import causal_mask
    from rlef_hpc.models.megatron_compat import seed
    from rlef_hpc.rl.logprobs import next_token_logprobs
    from rlef_hpc.rollout.vllm_engine import SamplingConfig, VLLMGenerator
    from rlef_hpc.train.sources import probe_sequences

    hf = real_model_dir()
    engine = VLLMGenerator(str(hf), SamplingConfig(), kv_cache_gib=0.5, dtype=args.dtype)
    init_process_groups()
    seed(0)
    cfg = read_model_config(hf)
    [policy] = build_from_hf(hf, cfg, PrecisionConfig(args.dtype), ("policy",))
    probe = probe_sequences(
        AutoTokenizer.from_pretrained(hf), load_problems(BUNDLED)[:2], EpisodeConfig()
    )
    limits = refit_probe_limits(args.dtype)

    def measure(label: str) -> None:
        length = probe.shape[1]
        with torch.no_grad():
            logits = policy(probe, torch.arange(length).expand(len(probe), -1), causal_mask(length))
        trainer = next_token_logprobs(logits.float(), probe)[0][:, 1:]
        got = torch.tensor(engine.sequence_logprobs(probe.tolist()))[:, 1:]
        mask = torch.ones_like(trainer, dtype=torch.bool)
        s = mismatch_stats(trainer, got, mask, limits.quantile_limit)
        caught = s["mismatch_mean"] > limits.mean_limit or s["mismatch_outliers"] > 0
        print(
            f"| {args.dtype} | {label} | {s['mismatch_mean']:.3g} | {s['mismatch_max']:.3g} | "
            f"{'stops the run' if caught else 'passes'} |",
            flush=True,
        )

    def move(step: int) -> None:  # a training step's worth of change, every weight
        torch.manual_seed(step)
        with torch.no_grad():
            for param in policy.parameters():
                param.add_(1e-3 * param.float().std() * torch.randn_like(param))

    print(
        f"probe: {tuple(probe.shape)} tokens; limits mean {limits.mean_limit}, max "
        f"{limits.quantile_limit}"
    )
    print("| dtype | refit | mean nats | max nats | probe |\n|---|---|---|---|---|")
    measure("none (the initial weights)")
    for refit in range(1, args.refits + 1):
        move(refit)
        engine.update_weights(engine_weights(policy, cfg))
        measure(f"{refit}")
    move(args.refits + 1)

    def stale() -> object:  # layer 15's attention output projection left as it was
        return ((n, t) for n, t in engine_weights(policy, cfg) if "layers.15.self_attn.o" not in n)

    engine.update_weights(stale())
    measure("one tensor stale (layer 15 o_proj)")
    move(args.refits + 2)
    engine.update_weights(hf_weights(policy, cfg))  # cf0390d's stream: no lm_head.weight
    measure("tied head not sent (cf0390d)")


if __name__ == "__main__":
    main()
