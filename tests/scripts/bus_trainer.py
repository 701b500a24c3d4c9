"""Under torchrun, 2 processes (TP=2): the disaggregated trainer's side of the weight bus
(rlef_hpc.train.sources.Disaggregated, as training uses it) for versions 1..LAST of a policy
that changes at every version, with the trainer's log-probs of each version beside it for
the workers (tests/scripts/bus_worker.py) to compare (test_weight_bus runs them).

    torchrun --nproc-per-node 2 tests/scripts/bus_trainer.py HF_DIR RUN_DIR LAST [KEY=VALUE ...]

Before each version the trainer waits until every worker says (RUN_DIR/ready-wN) that it
holds the previous one, so that each round has its members present; a worker killed
meanwhile is waited for until it is back. Each round's numbers go to RUN_DIR/rounds.jsonl.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist


def ready(run_dir: Path, workers: int, version: int) -> bool:
    def holds(w: int) -> bool:
        f = run_dir / f"ready-w{w}"
        return f.exists() and int(f.read_text() or -1) >= version

    return all(holds(w) for w in range(workers))


def main() -> None:
    hf_dir, run_dir, last = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    dist.init_process_group("gloo")
    from megatron.core import parallel_state as ps

    from rlef_hpc.checkpoint.hf_dir import build_from_hf, read_model_config
    from rlef_hpc.config import load
    from rlef_hpc.models.config import PrecisionConfig
    from rlef_hpc.models.megatron_compat import seed
    from rlef_hpc.rl.logprobs import token_logprobs
    from rlef_hpc.train.config import TrainConfig
    from rlef_hpc.train.sources import Disaggregated

    ps.initialize_model_parallel(2, 1)
    seed(0)
    cfg = load(TrainConfig, None, ["rollout.layout=disaggregated", *sys.argv[4:]])
    model_cfg = read_model_config(hf_dir)
    (policy,) = build_from_hf(hf_dir, model_cfg, PrecisionConfig(dtype="float32"), ("policy",))
    source = Disaggregated(cfg, run_dir, policy, model_cfg, start=0)

    sequences = [[(i * 7 + j * 3) % model_cfg.vocab_size for j in range(10)] for i in range(3)]
    x = torch.tensor(sequences, device="cpu")
    mask = torch.triu(torch.ones(1, 1, x.shape[1], x.shape[1], dtype=torch.bool), diagonal=1)
    for version in range(1, last + 1):
        torch.manual_seed(version)  # the same on both ranks: replicated weights stay equal
        with torch.no_grad():
            for p in policy.parameters():  # a new policy: every shard moves
                p.add_(0.05 * torch.randn_like(p))
            logits = policy(x, torch.arange(x.shape[1]).expand(len(x), -1), mask)
        logp, _ = token_logprobs(
            logits[:, :-1],
            x[:, 1:],
            vocab_start=ps.get_tensor_model_parallel_rank() * logits.shape[-1],
            group=ps.get_tensor_model_parallel_group(),
        )
        if dist.get_rank() == 0:
            torch.save({"sequences": sequences, "logp": logp}, run_dir / f"logp-{version}.pt")
            while not ready(run_dir, cfg.rollout.workers, version - 1):
                time.sleep(0.2)
        dist.barrier()
        stats = source.after_update(version, {})
        if dist.get_rank() == 0:
            with open(run_dir / "rounds.jsonl", "a") as f:
                f.write(json.dumps({"version": version, **stats}) + "\n")
    dist.barrier()


if __name__ == "__main__":
    from rlef_hpc import runtime

    runtime.setup()
    runtime.setup_megatron()
    main()
