"""training.resume_point over a run directory, for test_checkpoint_integrity (run by torchrun):
each rank writes what it chose and what it said to OUT.RANK (JSON).

    resume_point.py RUN_DIR OUT
"""

from __future__ import annotations

import json
import sys

import torch.distributed as dist

from rlef_hpc.checkpoint import training


def main() -> None:
    run_dir, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    said: list[str] = []
    chosen = training.resume_point(run_dir, say=said.append)
    result = {"chosen": chosen.name if chosen else None, "said": said}
    with open(f"{out}.{dist.get_rank()}", "w") as f:
        json.dump(result, f)
    dist.barrier()


if __name__ == "__main__":
    main()
