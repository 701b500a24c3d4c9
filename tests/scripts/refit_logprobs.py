"""Refit a (perturbed) megatron policy into vLLM and compare log-probs (test_refit runs it).

python tests/scripts/refit_logprobs.py HF_DIR CKPT_DIR
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def main() -> None:
    hf_dir, ckpt = Path(sys.argv[1]), Path(sys.argv[2])
    from rlef_hpc.rollout.vllm_engine import SamplingConfig, VLLMGenerator

    engine = VLLMGenerator(str(hf_dir), SamplingConfig(temperature=0.7, max_tokens=8))
    from rlef_hpc.checkpoint.convert import load_model_checkpoint
    from rlef_hpc.checkpoint.hf_dir import engine_weights
    from rlef_hpc.dist_env import init_process_groups
    from rlef_hpc.mismatch import MismatchLimits, mismatch_stats
    from rlef_hpc.models.megatron_compat import seed
    from rlef_hpc.rl.logprobs import token_logprobs
    from rlef_hpc.rollout.refit import RefitMismatchError, check_mismatch

    # fp32 on both sides: equal up to rounding, on every token (quantile 1: the max).
    exact = MismatchLimits(mean_limit=1e-4, quantile=1.0, quantile_limit=1e-4)

    init_process_groups()
    seed(0)
    model, cfg, _ = load_model_checkpoint(ckpt, "policy")
    with torch.no_grad():  # stands in for a training step: the trainer's weights move
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    sequences = [[(i * 7 + j * 3) % cfg.vocab_size for j in range(12)] for i in range(3)]

    def trainer_logprobs(tokens: torch.Tensor, temperature: float) -> torch.Tensor:
        seq = tokens.shape[1]
        mask = torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool), diagonal=1)
        with torch.no_grad():
            logits = model(tokens, torch.arange(seq).expand(len(tokens), seq), mask)
        return token_logprobs(logits[:, :-1], tokens[:, 1:], temperature)[0]

    trainer = trainer_logprobs(torch.tensor(sequences), 1.0)
    everywhere = torch.ones_like(trainer, dtype=torch.bool)
    before = torch.tensor(engine.sequence_logprobs(sequences))[:, 1:]
    stale = float((trainer - before).abs().max())
    engine.update_weights(engine_weights(model, cfg))
    after = torch.tensor(engine.sequence_logprobs(sequences))[:, 1:]
    stats = check_mismatch(trainer, after, everywhere, exact)
    print(f"STALE {stale:.6g} REFIT {stats['mismatch_max']:.6g}")

    # Sampling: the engine's log-probs of its sampled tokens are those of the distribution it
    # sampled from (temperature 0.7), which is what the trainer computes at that temperature.
    prompt = sequences[0][:5]
    [generation] = engine([prompt])
    full = torch.tensor([prompt + generation.tokens])
    sampled = trainer_logprobs(full, 0.7)[0, len(prompt) - 1 :]
    gap = float((sampled - torch.tensor(generation.logprobs)).abs().max())
    print(f"SAMPLED {len(generation.tokens)} GAP {gap:.6g}")

    def swapped():  # a broken refit: gate and up exchanged
        for name, tensor in engine_weights(model, cfg):
            if name.endswith("gate_proj.weight"):
                name = name.replace("gate_proj", "up_proj")
            elif name.endswith("up_proj.weight"):
                name = name.replace("up_proj", "gate_proj")
            yield name, tensor

    def scaled():  # a broken refit: the output projection's weights twice what they are
        for name, tensor in engine_weights(model, cfg):
            yield name, 2 * tensor if name == "lm_head.weight" else tensor

    for broken in (swapped, scaled):
        engine.update_weights(broken())
        corrupted = torch.tensor(engine.sequence_logprobs(sequences))[:, 1:]
        stats = mismatch_stats(trainer, corrupted, everywhere, MismatchLimits().quantile_limit)
        print("BROKEN", broken.__name__, " ".join(f"{k} {v:.6g}" for k, v in stats.items()))
        try:
            check_mismatch(trainer, corrupted, everywhere, exact)
            print("NOT CAUGHT")
        except RefitMismatchError as e:
            print(f"CAUGHT: {e}")


if __name__ == "__main__":
    main()
