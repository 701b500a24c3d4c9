"""One PPO update on a fixed batch under a given layout (run by torchrun from test_ppo_update).

torchrun --nproc-per-node N tests/scripts/ppo_update.py --tp T --pp P --init init.pt --out out.pt \
    [--whole]
python tests/scripts/ppo_update.py --make-init init.pt
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
from rlef_hpc.rl.optim import OptimConfig
from rlef_hpc.rl.ppo import PPOBatch, PPOConfig
from rlef_hpc.rl.update import PPOUpdate

MODEL = ModelConfig(
    vocab_size=128,
    hidden_size=64,
    num_layers=4,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=128,
    max_position_embeddings=64,
)
BATCH, SEQ = 8, 24
# Each row's turns (response spans): rows of 6 to 24 positions, one to three turns, random
# tokens after the last response (what micro-batches cut off, and --whole runs up to its
# minibatch's longest row).
SPANS = [
    [(3, 7), (12, 20)],
    [(4, 12)],
    [(2, 8)],
    [(3, 5), (7, 10)],
    [(5, 9), (11, 15), (18, 22)],
    [(2, 6)],
    [(4, 9), (11, 14)],
    [(6, 24)],
]
# Tokens per micro-batch: with the rows above, one or two rows each, and data-parallel ranks
# that need different numbers of micro-batches for a minibatch.
MICRO_BATCH_TOKENS = 32


def fixed_batch() -> PPOBatch:
    g = torch.Generator().manual_seed(7)
    k = max(len(spans) for spans in SPANS)
    tokens = torch.randint(0, MODEL.vocab_size, (BATCH, SEQ), generator=g)
    response = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    turn_of = torch.full((BATCH, SEQ), -1)
    value_index = torch.zeros(BATCH, k, dtype=torch.long)
    turn_mask = torch.zeros(BATCH, k, dtype=torch.bool)
    for row, spans in enumerate(SPANS):
        for j, (start, end) in enumerate(spans):
            response[row, start:end] = True
            turn_of[row, start:end] = j
            value_index[row, j] = start - 1
            turn_mask[row, j] = True
    reward = (torch.rand(BATCH, k, generator=g) * 2 - 1) * turn_mask
    behaviour = -torch.rand(BATCH, SEQ, generator=g) * 5 * response
    return PPOBatch(tokens, response, turn_of, value_index, turn_mask, reward, behaviour)


def answer_logprob(policy, tokens: torch.Tensor) -> float:
    """log p(tokens[-1] | tokens[:-1]) under the policy."""
    seq = tokens.shape[0]
    mask = torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool), diagonal=1)
    with torch.no_grad():
        logits = policy(tokens[None], torch.arange(seq)[None], mask)[0, -2].float()
    return float(torch.log_softmax(logits, -1)[tokens[-1]])


def reinforce(policy, value, reference, reward: float) -> None:
    """Half the rollouts answer X (rewarded `reward`), half answer Y (rewarded -reward)."""
    prompt = torch.tensor([3, 17, 42, 8, 99, 23, 5])
    x, y = 60, 61
    rows = [torch.cat([prompt, torch.tensor([a])]) for a in (x, y) * 4]
    tokens = torch.stack(rows)
    b, seq = tokens.shape
    response = torch.zeros(b, seq, dtype=torch.bool)
    response[:, -1] = True
    turn_of = torch.where(response, 0, -1)
    value_index = torch.full((b, 1), seq - 2)
    turn_mask = torch.ones(b, 1, dtype=torch.bool)
    rewards = torch.tensor([[reward], [-reward]] * 4)
    before = answer_logprob(policy, rows[0])
    behaviour = torch.full((b, seq), before) * response  # sampled by this very policy
    batch = PPOBatch(tokens, response, turn_of, value_index, turn_mask, rewards, behaviour)
    update = PPOUpdate(
        policy,
        value,
        reference,
        PPOConfig(),
        OptimConfig(lr=1e-3, warmup_steps=1),
    )
    update.step(batch)
    print(f"logp(X) {before:.6f} -> {answer_logprob(policy, rows[0]):.6f}")


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
    p.add_argument("--direction", type=float, help="reward of the answer to reinforce (+1 or -1)")
    p.add_argument(
        "--whole",
        action="store_true",
        help="each minibatch in one micro-batch, with every position's logits (the baseline)",
    )
    args = p.parse_args()
    dp = int(os.environ.get("WORLD_SIZE", "1")) // (args.tp * args.pp)
    validate(MODEL, ParallelConfig(args.tp, args.pp, dp), PrecisionConfig())  # before any group
    init_dist()
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(args.tp, args.pp)
    seed(1234)
    per_stage = MODEL.num_layers // args.pp
    policy = build_gpt(MODEL, PrecisionConfig())
    value = build_gpt(MODEL, PrecisionConfig(), value=True)
    reference = build_gpt(MODEL, PrecisionConfig())
    if args.direction is not None:
        reinforce(policy, value, reference, args.direction)
        return
    if args.make_init:
        torch.save(
            {
                "policy": gather_full_state(policy, per_stage),
                "value": gather_full_state(value, per_stage),
            },
            args.make_init,
        )
        return
    init = torch.load(args.init)
    load_full_state(policy, init["policy"], per_stage)
    load_full_state(reference, init["policy"], per_stage)
    # The value model's trunk starts from the policy's weights, its head from the init file.
    load_full_state(value, init["value"], per_stage)
    batch = fixed_batch()
    # Rows interleaved over data-parallel ranks: the m-th minibatch of every rank together is
    # the m-th minibatch of the whole batch, as in a single process.
    mine = batch.select(torch.arange(ps.get_data_parallel_rank(), BATCH, dp))
    update = PPOUpdate(
        policy,
        value,
        reference,
        PPOConfig(),
        # Small enough that Adam's update (~lr * sign) keeps layout rounding differences
        # below the comparison's 1e-5; large enough that every weight visibly moves.
        OptimConfig(lr=1e-4, warmup_steps=1, grad_clip=1.0),
        micro_batch_tokens=BATCH * SEQ if args.whole else MICRO_BATCH_TOKENS,
        select_logits=not args.whole,
    )
    metrics = update.step(mine, num_minibatches=2)
    # How much of Adam's state this rank holds (the distributed optimizer shards it over DP).
    adam = update.trainables["policy"].optimizer.chained_optimizers[0].optimizer
    metrics["adam_numel"] = sum(s["exp_avg"].numel() for s in adam.state.values())
    metrics["param_numel"] = sum(p.numel() for p in policy.parameters())
    state = {
        "policy": gather_full_state(policy, per_stage),
        "value": gather_full_state(value, per_stage),
    }
    if ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
        stage = ps.get_pipeline_model_parallel_rank()
        torch.save({"state": state, "metrics": metrics}, f"{args.out}.stage{stage}")
    dist.barrier()


if __name__ == "__main__":
    from rlef_hpc import runtime

    runtime.setup()
    runtime.setup_megatron()
    main()
