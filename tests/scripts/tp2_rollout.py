"""A disaggregated rollout worker's engine at tensor parallelism 2 (vLLM's worker processes,
on CPU): it follows a published policy version and samples by worker and shard seed; prints
the log-prob gaps to the published model's and the sampled tokens (test_rollout_engine runs it).

    python tests/scripts/tp2_rollout.py HF_DIR RUN_DIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# One NUMA node here: vLLM's automatic thread binding wants one per worker process.
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")


def main() -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    from rlef_hpc.rollout.config import RolloutConfig
    from rlef_hpc.rollout.publish import LATEST, WEIGHTS, WeightFollower
    from rlef_hpc.rollout.vllm_engine import build_engine
    from rlef_hpc.seeding import seed_sampling

    hf_dir, run_dir = sys.argv[1], Path(sys.argv[2])
    # Version 1 as the trainer publishes it: the HF-named tensors of a moved policy.
    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    stage = run_dir / WEIGHTS / "v00000001" / "stage-0"  # as publish() lays it out
    stage.mkdir(parents=True)
    tensors = {n: t.contiguous() for n, t in model.state_dict().items()}
    save_file(tensors, str(stage / "model-00001-of-00001.safetensors"), metadata={"format": "pt"})
    (run_dir / WEIGHTS / LATEST).write_text("1\n")

    sequences = [[(i * 7 + j * 3) % 200 + 3 for j in range(10)] for i in range(3)]
    with torch.no_grad():
        logits = model(torch.tensor(sequences)).logits.log_softmax(-1)
    published = logits[:, :-1].gather(-1, torch.tensor(sequences)[:, 1:, None])[..., 0]

    rollout = RolloutConfig(max_tokens=6, kv_cache_gib=0.0625)
    engine = build_engine(hf_dir, rollout, seed=0, dtype="float32", tensor_parallel=2)
    before = torch.tensor(engine.sequence_logprobs(sequences))[:, 1:]
    assert WeightFollower(engine, run_dir).refresh() == 1
    after = torch.tensor(engine.sequence_logprobs(sequences))[:, 1:]

    prompts = [[5, 9, 13, 17]] * 4  # one problem's rollouts
    samples = {}
    for name, worker in (("first", 0), ("again", 0), ("other", 1)):
        seed_sampling(0, f"worker{worker}", "shard3")  # as the rollout worker does
        samples[name] = [g.tokens for g in engine(prompts)]
    result = {
        "stale": float((before - published).abs().max()),
        "refit": float((after - published).abs().max()),
        **samples,
    }
    print("JSON" + json.dumps(result), flush=True)


if __name__ == "__main__":
    from rlef_hpc import runtime

    runtime.setup()
    main()
