"""Under torchrun, 2 processes: one PPO step of a TP=2 megatron policy, then a refit into a
vLLM engine running at TP=2 in the same processes (external_launcher), and the engine's
log-probs against the trainer's (test_refit runs it).

    torchrun --nproc-per-node 2 tests/scripts/refit_tp2.py HF_DIR CKPT_DIR [RUN_DIR]

With RUN_DIR, the trained policy is also published there (version 1) for a standalone rollout
worker, with the trainer's log-probs beside it (tests/scripts/weight_follower.py checks them).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def main() -> None:
    hf_dir, ckpt = Path(sys.argv[1]), Path(sys.argv[2])
    run_dir = Path(sys.argv[3]) if len(sys.argv) > 3 else None
    dist.init_process_group("gloo")
    from megatron.core import parallel_state as ps

    from rlef_hpc.checkpoint.convert import load_model_checkpoint
    from rlef_hpc.checkpoint.hf_dir import engine_weights
    from rlef_hpc.mismatch import MismatchLimits
    from rlef_hpc.models.megatron_compat import seed
    from rlef_hpc.rl.logprobs import token_logprobs
    from rlef_hpc.rl.optim import OptimConfig
    from rlef_hpc.rl.ppo import PPOBatch
    from rlef_hpc.rl.update import PPOUpdate
    from rlef_hpc.rollout.refit import check_mismatch
    from rlef_hpc.rollout.vllm_engine import SamplingConfig, VLLMGenerator

    ps.initialize_model_parallel(2, 1)
    seed(0)
    policy, cfg, _ = load_model_checkpoint(ckpt, "policy")
    reference, _, _ = load_model_checkpoint(ckpt, "policy")
    value, _, _ = load_model_checkpoint(ckpt, "value")
    engine = VLLMGenerator(
        str(hf_dir),
        SamplingConfig(max_tokens=4),
        tensor_parallel_size=2,
        distributed_executor_backend="external_launcher",
    )

    # One PPO step on a small batch: answer 60 rewarded, 61 punished.
    tokens = torch.tensor([[3, 17, 42, 8, 99, 23, a] for a in (60, 61, 60, 61)])
    b, seq = tokens.shape
    response = torch.zeros(b, seq, dtype=torch.bool)
    response[:, -1] = True
    batch = PPOBatch(
        tokens,
        response,
        torch.where(response, 0, -1),
        torch.full((b, 1), seq - 2),
        torch.ones(b, 1, dtype=torch.bool),
        torch.tensor([[1.0], [-1.0]] * 2),
        -2.0 * response,
    )
    PPOUpdate(policy, value, reference, optim_config=OptimConfig(lr=1e-2, warmup_steps=1)).step(
        batch
    )

    sequences = [[(i * 7 + j * 3) % cfg.vocab_size for j in range(10)] for i in range(3)]
    x = torch.tensor(sequences)
    mask = torch.triu(torch.ones(1, 1, x.shape[1], x.shape[1], dtype=torch.bool), diagonal=1)
    with torch.no_grad():
        logits = policy(x, torch.arange(x.shape[1]).expand(len(x), -1), mask)
    shard = logits.shape[-1]
    trainer, _ = token_logprobs(
        logits[:, :-1],
        x[:, 1:],
        vocab_start=ps.get_tensor_model_parallel_rank() * shard,
        group=ps.get_tensor_model_parallel_group(),
    )
    before = torch.tensor(engine.sequence_logprobs(sequences))[:, 1:]
    engine.update_weights(engine_weights(policy, cfg))
    after = torch.tensor(engine.sequence_logprobs(sequences))[:, 1:]
    everywhere = torch.ones_like(trainer, dtype=torch.bool)
    # fp32 on both sides: equal up to rounding, on every token (quantile 1: the max).
    exact = MismatchLimits(mean_limit=1e-4, quantile=1.0, quantile_limit=1e-4)
    stats = check_mismatch(trainer, after, everywhere, exact)
    if run_dir is not None:
        from rlef_hpc.rollout.publish import publish

        publish(run_dir, 1, policy, cfg)
        if dist.get_rank() == 0:
            torch.save({"sequences": sequences, "logp": trainer}, run_dir / "trainer_logp.pt")
    if dist.get_rank() == 0:
        stale = float((trainer - before).abs().max())
        print(f"TP2 STALE {stale:.6g} REFIT {stats['mismatch_max']:.6g}", flush=True)
    dist.barrier()


if __name__ == "__main__":
    main()
