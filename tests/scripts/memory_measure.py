"""Measures what megatron really allocates for one trainable model (DDP + distributed
optimizer) on this rank, for tools/plan.py's formulas to be checked against.

    torchrun --nproc-per-node 2 tests/scripts/memory_measure.py OUT.json DTYPE
"""

from __future__ import annotations

import json
import sys

import torch.distributed as dist


def main() -> None:
    from megatron.core import parallel_state as ps

    from rlef_hpc.checkpoint.sharded_state import _adams, _init_state
    from rlef_hpc.models.config import ModelConfig, PrecisionConfig
    from rlef_hpc.models.gpt import build_gpt
    from rlef_hpc.models.megatron_compat import seed
    from rlef_hpc.rl.optim import OptimConfig, make_trainable

    out, dtype = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    ps.initialize_model_parallel(1, 1)
    seed(0)
    shape = ModelConfig(512, 128, 3, 4, 2, 352, 256)
    model = build_gpt(shape, PrecisionConfig(dtype=dtype))
    trainable = make_trainable(model, OptimConfig(lr=1e-4))
    _init_state(trainable.optimizer)  # Adam's moments exist from the first step on

    def nbytes(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    adams = _adams(trainable.optimizer)
    master = [p for o in adams for g in o.param_groups for p in g["params"]]
    moments = [v for o in adams for s in o.state.values() for v in s.values() if v.dim() > 0]
    record = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "weight_bytes": nbytes(model.parameters()),
        "grad_buffer_bytes": nbytes(b.grad_data for b in trainable.model.buffers),
        # With 16-bit parameters Adam steps fp32 copies of this rank's shard (extra memory);
        # with fp32 parameters it steps the parameters' own shard.
        "master_bytes": nbytes(master) if dtype != "float32" else 0,
        "moment_bytes": nbytes(moments),
    }
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(record, f)
    dist.barrier()


if __name__ == "__main__":
    from rlef_hpc import runtime

    runtime.setup()
    runtime.setup_megatron()
    main()
