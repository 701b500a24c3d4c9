"""What the PPO update's policy forward/backward really allocates, on a small model of the
planner's shape at each vocabulary size given (everything else the same): the peak of live
tensor bytes above the pass's start (torch.profiler's allocation events, alloc_profile), for
tools/plan.py's logits term to be checked against (the difference between two vocabularies is
the logits path's alone).

    python tests/scripts/logits_memory.py OUT.json VOCAB [VOCAB ...]

One process (gloo, world size 1), fp32, on the CPU; the config is logits_memory.OVERRIDES: the
planner's longest episode (3 turns of 256 answer tokens and 1,024 prompt/feedback tokens) is
each row, one row a micro-batch.
"""

from __future__ import annotations

import json
import sys

import torch

TURNS, ANSWER, PROMPT = 3, 256, 1024
SEQ = TURNS * (ANSWER + PROMPT)  # the planner's longest episode (plan.PROMPT_TOKENS_PER_TURN)
ROWS = 2
OVERRIDES = [
    "model.hidden_size=64",
    "model.num_layers=2",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "model.ffn_hidden_size=128",
    f"model.max_position_embeddings={SEQ}",
    "precision.dtype=float32",
    f"episodes.max_turns={TURNS}",
    f"rollout.max_tokens={ANSWER}",
    f"update.micro_batch_tokens={SEQ}",
]


def batch(vocab: int):
    """ROWS episodes of SEQ tokens: each turn PROMPT tokens, then an answer of ANSWER."""
    from rlef_hpc.rl.ppo import PPOBatch

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (ROWS, SEQ), generator=g)
    response = torch.zeros(ROWS, SEQ, dtype=torch.bool)
    turn_of = torch.full((ROWS, SEQ), -1)
    value_index = torch.zeros(ROWS, TURNS, dtype=torch.long)
    for turn in range(TURNS):
        start = turn * (ANSWER + PROMPT) + PROMPT
        response[:, start : start + ANSWER] = True
        turn_of[:, start : start + ANSWER] = turn
        value_index[:, turn] = start - 1
    turn_mask = torch.ones(ROWS, TURNS, dtype=torch.bool)
    reward = torch.rand(ROWS, TURNS, generator=g) * 2 - 1
    behaviour = -torch.rand(ROWS, SEQ, generator=g) * response
    return PPOBatch(tokens, response, turn_of, value_index, turn_mask, reward, behaviour)


def measure(vocab: int) -> int:
    from alloc_profile import Phases, Timeline
    from torch.profiler import ProfilerActivity, profile

    from rlef_hpc.config import load
    from rlef_hpc.launch.config import JobConfig
    from rlef_hpc.models.config import PrecisionConfig
    from rlef_hpc.models.gpt import build_gpt
    from rlef_hpc.models.megatron_compat import seed
    from rlef_hpc.rl.update import PPOUpdate

    cfg = load(JobConfig, None, [*OVERRIDES, f"model.tokenizer_vocab={vocab}"])
    shape = cfg.model.known_shape()
    seed(0)
    fp32 = PrecisionConfig("float32")
    policy, value, reference = (
        build_gpt(shape, fp32),
        build_gpt(shape, fp32, value=True),
        build_gpt(shape, fp32),
    )
    update = PPOUpdate(policy, value, reference, micro_batch_tokens=SEQ)
    data = batch(shape.vocab_size)
    update.step(data)  # Adam's moments exist from the first step on
    Phases(update)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        update.step(data)
    peak, start = Timeline(prof).peaks()["policy forward/backward"]
    return peak - start


def main() -> None:
    from rlef_hpc.dist_env import init_process_groups

    out, vocabs = sys.argv[1], [int(v) for v in sys.argv[2:]]
    init_process_groups()
    torch.set_num_threads(1)
    record = {str(v): measure(v) for v in vocabs}
    with open(out, "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    from rlef_hpc import runtime

    runtime.setup()
    runtime.setup_megatron()
    main()
