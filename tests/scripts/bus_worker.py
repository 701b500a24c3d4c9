"""A rollout worker's engine (vLLM, in this process) following a trainer's versions through
the weight bus (tests/scripts/bus_trainer.py), until version LAST; after each version it
loads, the largest log-prob difference to the trainer's, and where it came from, one JSON
line each in RUN_DIR/worker-N.jsonl.

    python tests/scripts/bus_worker.py HF_DIR RUN_DIR N LAST [DIE_AT]

DIE_AT: the process kills itself (SIGKILL) in the middle of receiving that version, a few
tensors into it: a worker lost mid-broadcast.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def main() -> None:
    from rlef_hpc.rollout import bus, publish
    from rlef_hpc.rollout.vllm_engine import SamplingConfig, VLLMGenerator

    hf_dir, run_dir, worker, last = Path(sys.argv[1]), Path(sys.argv[2]), *map(int, sys.argv[3:5])
    die_at = int(sys.argv[5]) if len(sys.argv) > 5 else None
    if die_at is not None:
        real = publish.receive

        def dying(round_):
            for i, item in enumerate(real(round_)):
                if round_.version == die_at and i == 3:  # the round has more buckets to come
                    os.kill(os.getpid(), signal.SIGKILL)
                yield item

        publish.receive = dying
    engine = VLLMGenerator(str(hf_dir), SamplingConfig(max_tokens=4))
    follower = publish.WeightFollower(engine, run_dir, bus.BusReceiver(run_dir, worker, 1, 10.0))
    seen = None
    while seen != last:
        version = follower.refresh()
        if version is not None and version != seen:
            seen = version
            record = {"version": version, "via": follower.via}
            expected = run_dir / f"logp-{version}.pt"
            if expected.exists():
                trainer = torch.load(expected)
                got = torch.tensor(engine.sequence_logprobs(trainer["sequences"]))[:, 1:]
                record["max_diff"] = float((got - trainer["logp"]).abs().max())
            with open(run_dir / f"worker-{worker}.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            (run_dir / f"ready-w{worker}").write_text(str(version))
        time.sleep(0.1)


if __name__ == "__main__":
    from rlef_hpc import runtime

    runtime.setup()
    main()
