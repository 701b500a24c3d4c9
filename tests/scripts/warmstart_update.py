"""A few warm-start updates of fixed weights on fixed demonstrations under a given tensor
parallelism (run by torchrun from test_warmstart).

torchrun --nproc-per-node T tests/scripts/warmstart_update.py --tp T --init init.pt --out out.pt
python tests/scripts/warmstart_update.py --make-init init.pt
"""

from __future__ import annotations

import argparse
import os
import random

import torch
import torch.distributed as dist

from rlef_hpc.checkpoint.layout import gather_full_state, load_full_state
from rlef_hpc.models.config import ModelConfig, ParallelConfig, PrecisionConfig, validate
from rlef_hpc.models.gpt import build_gpt, causal_mask
from rlef_hpc.models.megatron_compat import seed
from rlef_hpc.rl.logprobs import token_logprobs
from rlef_hpc.train.warmstart import answer_batch, warm_start

MODEL = ModelConfig(
    vocab_size=128,
    hidden_size=64,
    num_layers=2,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=128,
    max_position_embeddings=64,
)
STEPS, BATCH, LR, SEED = 8, 4, 3e-3, 0


def examples() -> list[tuple[list[int], int]]:
    """Eight random sequences of 12 to 23 tokens, the second half of each the answer."""
    g = torch.Generator().manual_seed(3)
    out = []
    for length in torch.randint(12, 24, (8,), generator=g).tolist():
        out.append(
            (torch.randint(0, MODEL.vocab_size, (length,), generator=g).tolist(), length // 2)
        )
    return out


@torch.no_grad()
def untargeted_loss(model: torch.nn.Module, batch: list[tuple[list[int], int]]) -> float:
    """The first update's loss as the warm start computed it before next_token_logprobs: the
    log-probs of this rank's vocabulary shard alone, no offset and no group."""
    tokens, answer = answer_batch(batch)
    length = tokens.shape[1]
    logits = model(tokens, torch.arange(length).expand(len(tokens), -1), causal_mask(length))
    logp, _ = token_logprobs(logits[:, :-1], tokens[:, 1:])
    return float(-(logp * answer[:, 1:]).sum() / answer[:, 1:].sum())


def select(model: torch.nn.Module, data: list[tuple[list[int], int]], out: str) -> None:
    """Held out: five of the demonstrations with every answer token moved by one, which the
    more the model learns the demonstrations, the less it predicts: the loss is lowest early,
    and the weights kept must be those, not the last step's."""
    heldout = [([*t[:a], *((x + 1) % MODEL.vocab_size for x in t[a:])], a) for t, a in data[:5]]
    result = warm_start(model, data, STEPS, BATCH, LR, SEED, heldout=heldout, look_every=2)
    if dist.get_rank() == 0:
        final = untargeted_loss(model, heldout)  # the weights the model ends with
        torch.save({"heldout": result.heldout, "kept": result.kept, "final": final}, out)
    dist.barrier()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--init")
    p.add_argument("--out")
    p.add_argument("--make-init")
    p.add_argument("--select", help="warm start choosing by a held-out loss; results here")
    args = p.parse_args()
    validate(MODEL, ParallelConfig(args.tp, 1, 1), PrecisionConfig())  # before any group
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        dist.init_process_group("gloo")
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(args.tp, 1)
    seed(1234)
    model = build_gpt(MODEL, PrecisionConfig())
    if args.make_init:
        torch.save(gather_full_state(model, MODEL.num_layers), args.make_init)
        return
    load_full_state(model, torch.load(args.init), MODEL.num_layers)
    data = examples()
    if args.select:
        select(model, data, args.select)
        return
    # The first batch as warm_start draws it (one data-parallel rank).
    first = random.Random(SEED).sample(data, min(BATCH, len(data)))
    untargeted = untargeted_loss(model, first)
    # How many positions' logits the output layer computes, per step (its output [s, b, v]).
    head_rows = []
    hook = model.output_layer.register_forward_hook(
        lambda _, args, out: head_rows.append(out[0].shape[0] * out[0].shape[1])
    )
    losses = warm_start(model, data, STEPS, BATCH, LR, SEED).losses
    hook.remove()
    answer_tokens = int(answer_batch(first)[1].sum())
    state = gather_full_state(model, MODEL.num_layers)  # the plain model, updated in place
    if dist.get_rank() == 0:
        torch.save(
            {
                "losses": losses,
                "untargeted": untargeted,
                "state": state,
                "head_rows": head_rows,
                "answer_tokens": answer_tokens,
            },
            args.out,
        )
    dist.barrier()


if __name__ == "__main__":
    from rlef_hpc import runtime

    runtime.setup()
    runtime.setup_megatron()
    main()
