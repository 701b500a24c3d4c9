"""Under torchrun, 2 processes: a Hugging Face model of any supported family imported into
megatron (build_from_hf: each rank reads its slices) at TP1, TP2 and PP2 in turn, and its
logits on fixed tokens saved per layout for test_families to compare with transformers'.

    torchrun --nproc-per-node 2 tests/scripts/family_logits.py HF_DIR OUT_DIR [LAYOUT ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}


def tokens(vocab: int) -> torch.Tensor:
    return torch.arange(2 * 9, device="cpu").reshape(2, 9) * 37 % vocab


def logits(model, cfg) -> torch.Tensor | None:
    """The full [b, s, vocab] logits on the last stage's TP rank 0 (None elsewhere); the
    pipeline by hand: hidden states sent stage to stage."""
    from megatron.core import parallel_state as ps

    x = tokens(cfg.vocab_size)
    seq = x.shape[1]
    mask = torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool), diagonal=1)
    if not ps.is_pipeline_first_stage():
        hidden = torch.empty(seq, len(x), cfg.hidden_size)
        dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
    with torch.no_grad():
        out = model(x, torch.arange(seq).expand(len(x), seq), mask)
    if not ps.is_pipeline_last_stage():
        dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        return None
    shards = [torch.empty_like(out) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(shards, out.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(shards, dim=-1) if ps.get_tensor_model_parallel_rank() == 0 else None


def main() -> None:
    hf_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    layouts = sys.argv[3:] or list(LAYOUTS)
    dist.init_process_group("gloo")
    from megatron.core import parallel_state as ps

    from rlef_hpc.checkpoint.hf_dir import build_from_hf, read_model_config
    from rlef_hpc.models.config import PrecisionConfig
    from rlef_hpc.models.megatron_compat import seed

    cfg = read_model_config(hf_dir)
    for name in layouts:
        ps.initialize_model_parallel(*LAYOUTS[name])
        seed(0)
        [model] = build_from_hf(hf_dir, cfg, PrecisionConfig("float32"), ("policy",))
        result = logits(model, cfg)
        if result is not None and ps.get_data_parallel_rank() == 0:
            torch.save(result, out / f"{name}.pt")
        del model
        dist.barrier()
        ps.destroy_model_parallel()


if __name__ == "__main__":
    main()
