"""Under torchrun, 4 processes: a TP2 x DP2 megatron policy with one vLLM engine at TP2 on each
tensor-parallel pair (external_launcher over gloo), built as the colocated trainer builds them;
test_colocated_tp runs it and reads the JSON rank 0 prints.

    torchrun --nproc-per-node 4 tests/scripts/colocated_tp_refit.py HF_DIR

- refit: the policy moved, then each rank's shards into its own engine rank (the vocabulary
  gathered, then, where the cuts match, as shards too): the engine's log-probs against the
  trainer's, every token, before ("stale") and after each refit;
- a broken refit (one rank's o_proj shard scaled on its way) is caught by the probe's check;
- lockstep: the leader of each pair samples, its partner follows; what each engine call
  returned on each rank, for the test to compare (a pair's ranks must agree, two pairs
  seeded apart must not);
- this process's peak memory (RSS) and the wall time of the whole.
"""

from __future__ import annotations

import json
import resource
import sys
import time
import zlib
from pathlib import Path

import torch
import torch.distributed as dist


class Recorder:
    """The engine as EngineGroup sees it, recording what each call sampled on this rank."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def __call__(self, prompts, temperature=None, top_p=None):
        out = self.engine(prompts, temperature=temperature, top_p=top_p)
        self.calls.append([g.tokens for g in out])
        return out

    def sequence_logprobs(self, sequences):
        return self.engine.sequence_logprobs(sequences)


def move(policy, step: int, tp_rank: int) -> None:
    """A deterministic step away: the same on data-parallel replicas (seeded by the shard),
    the same on tensor-parallel ranks for replicated tensors."""
    with torch.no_grad():
        for name, p in policy.named_parameters():
            shard = tp_rank if getattr(p, "tensor_model_parallel", False) else -1
            g = torch.Generator().manual_seed(zlib.crc32(f"{step}:{shard}:{name}".encode()))
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def main() -> None:
    from rlef_hpc import runtime

    runtime.setup()
    runtime.setup_megatron()
    start = time.perf_counter()
    hf = Path(sys.argv[1])
    from megatron.core import parallel_state as ps

    from rlef_hpc.checkpoint.hf_dir import build_from_hf, read_model_config
    from rlef_hpc.dist_env import init_process_groups
    from rlef_hpc.mismatch import MismatchLimits
    from rlef_hpc.models.config import PrecisionConfig
    from rlef_hpc.models.gpt import causal_mask
    from rlef_hpc.models.megatron_compat import seed
    from rlef_hpc.rl.logprobs import next_token_logprobs
    from rlef_hpc.rollout.config import RolloutConfig
    from rlef_hpc.rollout.lockstep import EngineGroup, tensor_host_group
    from rlef_hpc.rollout.refit import RefitMismatchError, check_mismatch
    from rlef_hpc.rollout.tp_refit import load_rank_weights, rank_weights, vocab_cuts_match
    from rlef_hpc.rollout.vllm_engine import build_engine
    from rlef_hpc.seeding import seed_sampling

    init_process_groups(2, 1)
    seed(0)
    rollout = RolloutConfig(max_tokens=8, kv_cache_gib=0.0625)
    engine = build_engine(str(hf), rollout, 0, "float32", tensor_parallel=2, colocated=True)
    cfg = read_model_config(hf)
    [policy] = build_from_hf(hf, cfg, PrecisionConfig(dtype="float32"), ("policy",))
    tp_rank, dp_rank = ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank()
    group = tensor_host_group(ps.get_tensor_model_parallel_group())
    recorder = Recorder(engine)
    engines = EngineGroup(recorder, group)
    natural = vocab_cuts_match(engine, cfg.vocab_size, group)

    sequences = [[(i * 7 + j * 3) % (cfg.vocab_size - 3) + 3 for j in range(12)] for i in range(3)]
    x = torch.tensor(sequences)
    positions = torch.arange(x.shape[1]).expand(len(x), -1)

    @torch.no_grad()
    def trainer_logprobs():
        logits = policy(x, positions, causal_mask(x.shape[1]))
        return next_token_logprobs(logits.float(), x)[0][:, 1:]

    def engine_logprobs():
        return torch.tensor(engines.sequence_logprobs(sequences))[:, 1:]

    every = torch.ones(len(sequences), x.shape[1] - 1, dtype=torch.bool)
    exact = MismatchLimits(mean_limit=1e-4, quantile=1.0, quantile_limit=1e-4)
    result: dict = {"vocab_cuts_match": natural, "refits": []}
    for step, vocab_shards in enumerate(dict.fromkeys((False, natural))):
        move(policy, step, tp_rank)
        trainer = trainer_logprobs()
        stale = float((engine_logprobs() - trainer).abs().max())
        load_rank_weights(engine, rank_weights(policy, cfg, vocab_shards), vocab_shards)
        stats = check_mismatch(trainer, engine_logprobs(), every, exact)  # raises if off
        result["refits"].append(
            {"vocab_shards": vocab_shards, "stale": stale, "max": stats["mismatch_max"]}
        )

    # A broken refit: rank 1's o_proj shard of layer 0 scaled on its way to the engine.
    def broken():
        for name, tensor in rank_weights(policy, cfg, natural):
            if tp_rank == 1 and name == "model.layers.0.self_attn.o_proj.weight":
                tensor = tensor * 1.5
            yield name, tensor

    load_rank_weights(engine, broken(), natural)
    try:
        check_mismatch(trainer_logprobs(), engine_logprobs(), every, exact)
        result["broken"] = "NOT CAUGHT"
    except RefitMismatchError as e:
        result["broken"] = f"CAUGHT: {e}"
    load_rank_weights(engine, rank_weights(policy, cfg, natural), natural)

    # Lockstep: each pair's leader samples (twice: two engine calls), its partner follows.
    prompts = [[5, 9, 13, 17], [5, 9, 13, 17], [21, 8, 3]]
    seed_sampling(0, "lockstep", dp_rank)
    if engines.leader:
        for temperature in (1.0, 0.7):
            engines.generate(prompts, temperature, 1.0)
        engines.release()
    else:
        engines.follow()
    calls: list = [None] * dist.get_world_size()
    dist.all_gather_object(calls, recorder.calls)
    peak: list = [None] * dist.get_world_size()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    dist.all_gather_object(peak, rss)
    if dist.get_rank() == 0:
        result.update(
            calls=calls,
            peak_rss_mb=peak,
            seconds=time.perf_counter() - start,
        )
        print("JSON" + json.dumps(result), flush=True)
    dist.barrier()


if __name__ == "__main__":
    main()
