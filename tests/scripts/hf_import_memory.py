"""Under torchrun, 4 processes (TP=2 x PP=2): the peak resident memory each rank adds while
building the trainer's three models (policy, reference, value) from an HF directory, against
the peak of building the same three models without reading anything (megatron's CPU
initialisation makes each full tensor, then its split, so that baseline itself varies by a
few tensors from run to run), and whether each holds its shard of those weights
(test_checkpoint runs it).

    torchrun --nproc-per-node 4 tests/scripts/hf_import_memory.py HF_DIR OUT.json

The peak is the kernel's (VmHWM, reset through /proc/self/clear_refs just before building):
it sees every allocation and every mapped page of the safetensors files.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from peak_rss import PeakRSS

KINDS = ("policy", "policy", "value")  # policy, reference, value


def main() -> None:
    from megatron.core import parallel_state as ps
    from safetensors.torch import load_file

    from rlef_hpc.checkpoint.hf import hf_to_megatron
    from rlef_hpc.checkpoint.hf_dir import build_from_hf, read_model_config
    from rlef_hpc.checkpoint.layout import gather_full_state
    from rlef_hpc.models.config import PrecisionConfig
    from rlef_hpc.models.gpt import build_gpt
    from rlef_hpc.models.megatron_compat import seed

    hf_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    dist.init_process_group("gloo")
    ps.initialize_model_parallel(2, 2)
    seed(0)
    cfg = read_model_config(hf_dir)
    precision = PrecisionConfig(dtype="float32")

    # The baseline first, freed before the import: large blocks are mmapped (the test sets
    # MALLOC_MMAP_THRESHOLD_), so freeing them returns the pages to the kernel.
    with PeakRSS() as baseline:
        models = [build_gpt(cfg, precision, value=kind == "value") for kind in KINDS]
    del models
    gc.collect()

    with PeakRSS() as peak:
        models = build_from_hf(hf_dir, cfg, precision, KINDS)
    own = sum(p.numel() * p.element_size() for m in models for p in m.parameters())

    # Now the whole checkpoint may be read: each model's stage against it.
    full = hf_to_megatron(
        {k: v for f in sorted(hf_dir.glob("*.safetensors")) for k, v in load_file(f).items()}, cfg
    )
    per_stage = cfg.num_layers // ps.get_pipeline_model_parallel_world_size()
    for kind, model in zip(("policy", "reference", "value"), models, strict=True):
        for name, tensor in gather_full_state(model, per_stage).items():
            if kind == "value" and name.startswith("output_layer"):
                assert tensor.shape[0] == 1, (name, tensor.shape)  # the fresh head
                continue
            torch.testing.assert_close(tensor, full[name], rtol=0, atol=0, msg=f"{kind} {name}")

    record = {
        "tp": ps.get_tensor_model_parallel_rank(),
        "pp": ps.get_pipeline_model_parallel_rank(),
        "peak_bytes": peak.bytes,
        "build_peak_bytes": baseline.bytes,
        "own_bytes": own,
    }
    records: list = [None] * dist.get_world_size()
    dist.all_gather_object(records, record)
    if dist.get_rank() == 0:
        sizes = [t.numel() * t.element_size() for t in full.values()]
        out.write_text(json.dumps({"ranks": records, "model_bytes": sum(sizes)}, indent=2))
    dist.barrier()


if __name__ == "__main__":
    from rlef_hpc import runtime

    runtime.setup()
    runtime.setup_megatron()
    main()
