"""A standalone rollout worker's engine (vLLM, its own process, TP=1) following the weights a
trainer published in RUN_DIR; prints the largest log-prob difference to the trainer's.

    python tests/scripts/weight_follower.py HF_DIR RUN_DIR
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def main() -> None:
    from rlef_hpc.rollout.publish import WeightFollower
    from rlef_hpc.rollout.vllm_engine import SamplingConfig, VLLMGenerator

    hf_dir, run_dir = Path(sys.argv[1]), Path(sys.argv[2])
    engine = VLLMGenerator(str(hf_dir), SamplingConfig(max_tokens=4))
    follower = WeightFollower(engine, run_dir)
    expected = torch.load(run_dir / "trainer_logp.pt")
    assert follower.refresh() == 1
    assert follower.refresh() == 1  # nothing newer: no reload
    got = torch.tensor(engine.sequence_logprobs(expected["sequences"]))[:, 1:]
    print(f"STANDALONE {float((got - expected['logp']).abs().max()):.6g}", flush=True)


if __name__ == "__main__":
    from rlef_hpc import runtime

    runtime.setup()
    main()
