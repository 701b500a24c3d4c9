"""A trainer's policy (megatron, TP1, this process) of any family refit into a vLLM engine by
every transport, one new version each: in memory (an engine in this process), as published
files, and over the weight bus (its sender in a thread of this process, the engine's processes
receiving); after each, the engine's log-probs against transformers' on the version's HF
tensors (test_families runs it). ENGINE_TP 2: vLLM's own worker processes (no in-memory
transport then: tensors do not pickle).

    python tests/scripts/refit_families.py HF_DIR RUN_DIR ENGINE_TP
"""

from __future__ import annotations

import functools
import json
import os
import sys
import threading
import time
from pathlib import Path

import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # one NUMA node here
os.environ.setdefault("RLEF_BUS_ADDR", "127.0.0.1")


def main() -> None:
    hf_dir, run_dir, engine_tp = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    from transformers import AutoModelForCausalLM

    from rlef_hpc.rollout.vllm_engine import SamplingConfig, VLLMGenerator

    engine = VLLMGenerator(
        str(hf_dir),
        SamplingConfig(max_tokens=4),
        kv_cache_gib=0.0625,
        tensor_parallel_size=engine_tp,
    )
    from rlef_hpc.checkpoint.hf_dir import (
        build_from_hf,
        engine_weights,
        hf_weights,
        read_model_config,
    )
    from rlef_hpc.dist_env import host_group, init_process_groups
    from rlef_hpc.models.config import PrecisionConfig
    from rlef_hpc.models.megatron_compat import seed
    from rlef_hpc.rollout import bus, publish

    init_process_groups()  # one process (an in-process engine made the group already)
    seed(0)
    cfg = read_model_config(hf_dir)
    [policy] = build_from_hf(hf_dir, cfg, PrecisionConfig("float32"), ("policy",))
    reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    sequences = [[(i * 7 + j * 3) % cfg.vocab_size for j in range(12)] for i in range(3)]
    x = torch.tensor(sequences, device="cpu")

    def new_version(version: int) -> torch.Tensor:
        """Moves every weight of the policy; transformers' log-probs on its HF tensors."""
        torch.manual_seed(version)
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(0.05 * torch.randn_like(p))
        missing, unexpected = reference.load_state_dict(dict(hf_weights(policy, cfg)), strict=False)
        assert not unexpected and set(missing) <= (
            {"lm_head.weight"} if cfg.tie_embeddings else set()
        )
        with torch.no_grad():
            logp = reference(x).logits.log_softmax(-1)
        return logp[:, :-1].gather(-1, x[:, 1:, None])[..., 0]

    def in_memory(version: int) -> None:
        engine.update_weights(engine_weights(policy, cfg))

    def files(version: int) -> None:
        publish.publish(run_dir, version, policy, cfg)
        engine.update_weights_from(functools.partial(publish.read_published, str(run_dir), version))

    sender = bus.BusSender(run_dir, 1, 1, 60.0, 60.0, host_group())
    receiver = bus.BusReceiver(run_dir, 0, engine_tp, 60.0)

    def over_the_bus(version: int) -> None:
        sent: dict = {}
        thread = threading.Thread(
            target=lambda: sent.update(sender.send(version, lambda: engine_weights(policy, cfg)))
        )
        thread.start()
        while receiver.announced() != version:
            time.sleep(0.05)
        round_ = receiver.join(version)
        engine.update_weights_from(functools.partial(bus.receive, round_))
        thread.join()
        assert sent["bus_ok"] == 1.0, sent

    transports = {"in_memory": in_memory, "files": files, "bus": over_the_bus}
    if engine_tp > 1:
        del transports["in_memory"]
    result = {}
    for version, (name, transport) in enumerate(transports.items(), start=1):
        expected = new_version(version)
        before = torch.tensor(engine.sequence_logprobs(sequences))[:, 1:]
        transport(version)
        after = torch.tensor(engine.sequence_logprobs(sequences))[:, 1:]
        result[name] = {
            "stale": float((before - expected).abs().max()),
            "refit": float((after - expected).abs().max()),
        }
    print("JSON" + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
