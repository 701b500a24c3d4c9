"""Under torchrun, 4 processes (TP=2 x DP=2): the peak resident memory each rank adds while
publishing a policy whose tensors are small next to the whole model, and whether what was
published is the model (test_publish runs it).

    torchrun --nproc-per-node 4 tests/scripts/publish_memory.py RUN_DIR OUT.json

The peak is the kernel's (VmHWM, reset through /proc/self/clear_refs just before publishing):
it sees every allocation, torch's included, unlike tracemalloc.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from peak_rss import PeakRSS

SHARD_BYTES = 8 << 20


def main() -> None:
    from megatron.core import parallel_state as ps

    from rlef_hpc.checkpoint.hf_dir import hf_weights
    from rlef_hpc.models.config import ModelConfig, PrecisionConfig
    from rlef_hpc.models.gpt import build_gpt
    from rlef_hpc.models.megatron_compat import seed
    from rlef_hpc.rollout.publish import publish, read_published

    run_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    dist.init_process_group("gloo")
    ps.initialize_model_parallel(2, 1)
    seed(0)
    # 16 layers, fp32: the whole model (200 MB) is 50 times its largest tensor (4 MB).
    cfg = ModelConfig(2048, 512, 16, 8, 4, 1536, 256)
    model = build_gpt(cfg, PrecisionConfig(dtype="float32"))

    with PeakRSS() as peak:
        publish(run_dir, 1, model, cfg, shard_bytes=SHARD_BYTES)

    record = {
        "dp": ps.get_data_parallel_rank(),
        "tp": ps.get_tensor_model_parallel_rank(),
        "peak_bytes": peak.bytes,
    }
    records: list = [None] * dist.get_world_size()
    dist.all_gather_object(records, record)
    expected = {name: t.clone() for name, t in hf_weights(model, cfg)}  # every rank gathers
    if dist.get_rank() == 0:
        got = dict(read_published(run_dir, 1))
        assert got.keys() == expected.keys(), sorted(got.keys() ^ expected.keys())
        for name, tensor in expected.items():
            torch.testing.assert_close(got[name], tensor, rtol=0, atol=0, msg=name)
        sizes = [t.numel() * t.element_size() for t in expected.values()]
        summary = {
            "ranks": records,
            "model_bytes": sum(sizes),
            "largest_tensor_bytes": max(sizes),
            "shard_bytes": SHARD_BYTES,
            "files": len(list((run_dir / "weights" / "v00000001").rglob("*.safetensors"))),
        }
        out.write_text(json.dumps(summary, indent=2))
    dist.barrier()


if __name__ == "__main__":
    from rlef_hpc import runtime

    runtime.setup()
    runtime.setup_megatron()
    main()
