"""One PPO update on a fixed batch under a given layout (run by torchrun from test_ppo_update).

    torchrun --nproc-per-node N tests/ppo_worker.py --tp T --pp P --init init.pt --out out.pt
    python tests/ppo_worker.py --make-init init.pt
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from rlef_hpc.checkpoint.layout import gather_full_state, load_full_state
from rlef_hpc.models.config import ModelConfig, ParallelConfig, PrecisionConfig, validate
from rlef_hpc.models.gpt import build_gpt
from rlef_hpc.models.megatron_compat import seed
from rlef_hpc.rl.ppo import PPOBatch, PPOConfig
from rlef_hpc.rl.update import OptimConfig, PPOUpdate

MODEL = ModelConfig(vocab_size=128, hidden_size=64, num_layers=4, num_attention_heads=4,
                    num_query_groups=2, ffn_hidden_size=128, max_position_embeddings=64)  # fmt: skip
BATCH, SEQ = 4, 16


def fixed_batch() -> PPOBatch:
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, MODEL.vocab_size, (BATCH, SEQ), generator=g)
    response = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    turn_of = torch.full((BATCH, SEQ), -1)
    value_index = torch.zeros(BATCH, 2, dtype=torch.long)
    turn_mask = torch.zeros(BATCH, 2, dtype=torch.bool)
    for row in range(BATCH):
        spans = [(3, 7), (9, 13)] if row % 2 else [(4, 12)]
        for k, (start, end) in enumerate(spans):
            response[row, start:end] = True
            turn_of[row, start:end] = k
            value_index[row, k] = start - 1
            turn_mask[row, k] = True
    reward = torch.tensor([[1.0, 0.0], [-0.2, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    behaviour = -torch.rand(BATCH, SEQ, generator=g) * 5 * response
    return PPOBatch(tokens, response, turn_of, value_index, turn_mask, reward, behaviour)


def init_dist() -> None:
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29531")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        dist.init_process_group("gloo")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--init")
    p.add_argument("--out")
    p.add_argument("--make-init")
    args = p.parse_args()
    init_dist()
    from megatron.core import parallel_state as ps

    dp = dist.get_world_size() // (args.tp * args.pp)
    validate(MODEL, ParallelConfig(args.tp, args.pp, dp), PrecisionConfig())
    ps.initialize_model_parallel(args.tp, args.pp)
    seed(1234)
    per_stage = MODEL.num_layers // args.pp
    policy = build_gpt(MODEL, PrecisionConfig())
    value = build_gpt(MODEL, PrecisionConfig(), value=True)
    reference = build_gpt(MODEL, PrecisionConfig())
    if args.make_init:
        torch.save({"policy": gather_full_state(policy, per_stage),
                    "value": gather_full_state(value, per_stage)}, args.make_init)  # fmt: skip
        return
    init = torch.load(args.init)
    load_full_state(policy, init["policy"], per_stage)
    load_full_state(reference, init["policy"], per_stage)
    # The value model's trunk starts from the policy's weights, its head from the init file.
    load_full_state(value, init["value"], per_stage)
    batch = fixed_batch()
    rows = BATCH // dp
    mine = batch.select(slice(ps.get_data_parallel_rank() * rows, (ps.get_data_parallel_rank() + 1) * rows))
    update = PPOUpdate(policy, value, reference, PPOConfig(),
                       OptimConfig(lr=1e-3, warmup_steps=1, grad_clip=1.0), micro_batch_size=1)  # fmt: skip
    metrics = update.step(mine)
    state = {"policy": gather_full_state(policy, per_stage), "value": gather_full_state(value, per_stage)}
    if ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
        stage = ps.get_pipeline_model_parallel_rank()
        torch.save({"state": state, "metrics": metrics}, f"{args.out}.stage{stage}")
    dist.barrier()


if __name__ == "__main__":
    main()
