"""Forward and backward of a tiny GPT with and without full activation recomputation; prints
the largest differences of the logits and of the gradients (expected: none).

    python tests/scripts/recompute_compare.py
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def main() -> None:
    from megatron.core import parallel_state as ps

    from rlef_hpc.models.config import ModelConfig, PrecisionConfig
    from rlef_hpc.models.gpt import build_gpt
    from rlef_hpc.models.megatron_compat import seed

    os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo")
    ps.initialize_model_parallel(1, 1)
    shape = ModelConfig(64, 32, 2, 4, 2, 64, 128)
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.triu(torch.ones(1, 1, 16, 16, dtype=torch.bool), 1)
    results = []
    for recompute in (None, "full"):
        seed(0)
        model = build_gpt(shape, PrecisionConfig(recompute=recompute))
        assert model.config.recompute_granularity == ("full" if recompute else None)
        logits = model(x, torch.arange(16).expand(2, -1), mask)
        logits.float().pow(2).mean().backward()
        results.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
    (a, grads_a), (b, grads_b) = results
    grad_diff = max((g - h).abs().max().item() for g, h in zip(grads_a, grads_b, strict=True))
    print(f"RECOMPUTE logits {(a - b).abs().max().item():.3g} grads {grad_diff:.3g}")


if __name__ == "__main__":
    from rlef_hpc import runtime

    runtime.setup()
    runtime.setup_megatron()
    main()
