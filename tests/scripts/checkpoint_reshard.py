"""Loads a model checkpoint at a TP x PP layout, writes its logits on fixed inputs, and saves
the model again from that layout (run by torchrun from test_checkpoint)."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
import torch.distributed as dist


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, required=True)
    p.add_argument("--pp", type=int, required=True)
    p.add_argument("--ckpt", type=Path, required=True)
    p.add_argument("--resave", type=Path, required=True)
    p.add_argument("--logits", type=Path, required=True)
    args = p.parse_args()
    dist.init_process_group("gloo")
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from rlef_hpc.checkpoint.convert import load_model_checkpoint
    from rlef_hpc.models.megatron_compat import seed

    ps.initialize_model_parallel(args.tp, args.pp)
    seed(0)
    model, cfg, _ = load_model_checkpoint(args.ckpt, "policy")
    tokens = torch.arange(12).reshape(2, 6) * 7 % cfg.vocab_size
    seq = tokens.shape[1]
    mask = torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool), diagonal=1)
    positions = torch.arange(seq).expand(2, seq)
    # Pipeline by hand: send the hidden states stage to stage.
    if not ps.is_pipeline_first_stage():
        hidden = torch.empty(seq, 2, cfg.hidden_size)
        dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
    with torch.no_grad():
        out = model(tokens, positions, mask)
    if not ps.is_pipeline_last_stage():
        dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
    else:
        shards = [torch.empty_like(out) for _ in range(args.tp)]
        dist.all_gather(shards, out.contiguous(), group=ps.get_tensor_model_parallel_group())
        if ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
            torch.save(torch.cat(shards, dim=-1), args.logits)
    (args.resave / "policy").mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), str(args.resave / "policy"))
    if dist.get_rank() == 0:
        shutil.copy(args.ckpt / "model_config.json", args.resave / "model_config.json")
    dist.barrier()


if __name__ == "__main__":
    from rlef_hpc import runtime

    runtime.setup()
    runtime.setup_megatron()
    main()
