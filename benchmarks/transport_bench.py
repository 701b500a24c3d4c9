"""A refit to two rollout workers by each transport of rollout.weights, in one run on CPU:
the weight bus (gloo over loopback) against the files in run_dir/weights (written by the
trainer, read back by each worker). Each worker is a vLLM engine in a process of its own.

    python benchmarks/transport_bench.py [--hidden 2048 --layers 16]   (0.85B parameters)

Seconds: from the trainer's start of the refit until both engines hold the version (their
load included). On one host the workers read the files back from the writer's page cache,
which workers on other nodes cannot: across nodes the files path is slower than here (the
planner, tools/plan.py, prices both transports with a cluster's link rates). Trainer peak:
the most resident memory the trainer added during the refit (VmHWM), beside the bus's bucket
(rollout.weights.bucket_mib) and the files' shard size. "Trainer blocked": what the training
loop waits. A first pass times the transport alone (workers drain the stream), a second one
the refit into vLLM engines.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from random_llama import random_llama

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
WORKERS = 2


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _wait_for(what: Path, minimum: int, timeout_s: float = 1800) -> None:
    deadline = time.monotonic() + timeout_s
    while not (what.exists() and what.read_text() and int(what.read_text()) >= minimum):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} never reached {minimum}")
        time.sleep(0.02)


def trainer(tmp: Path, rounds: list[str], bucket_mib: int) -> None:
    from rlef_hpc.checkpoint.convert import load_model_checkpoint
    from rlef_hpc.checkpoint.hf_dir import hf_weights
    from rlef_hpc.dist_env import host_group, init_process_groups
    from rlef_hpc.rollout.bus import BusSender
    from rlef_hpc.rollout.publish import publish

    init_process_groups()
    policy, cfg, _ = load_model_checkpoint(tmp / "ckpt", "policy")
    run = tmp / "run"
    bus = BusSender(run, WORKERS, bucket_mib, 60.0, 600.0, host_group())
    publish(run, 0, policy, cfg)
    results = []
    for version, transport in enumerate(rounds, start=1):
        for w in range(WORKERS):
            _wait_for(run / f"ready-{w}", version - 1)
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here
        before = _rss_kib("VmRSS")
        start = time.time()
        if transport == "bus":
            bus.send(version, lambda: hf_weights(policy, cfg))
        else:
            publish(run, version, policy, cfg)
        blocked = time.time() - start  # what the training loop waits
        for w in range(WORKERS):
            _wait_for(run / f"ready-{w}", version)
        loaded = max(float((run / f"loaded-{w}").read_text()) for w in range(WORKERS))
        peak = (_rss_kib("VmHWM") - before) * 1024
        results.append(
            {"transport": transport, "seconds": loaded - start, "blocked": blocked, "peak": peak}
        )
    (tmp / "results.json").write_text(json.dumps(results))


class Drain:
    """An engine that takes every tensor and keeps none: the transport alone."""

    def update_weights_from(self, load) -> None:  # noqa: ANN001
        for _, tensor in load():
            tensor.view(-1)[-1].item()  # every byte has arrived (a file's are read)


def worker(tmp: Path, n: int, last: int, drain: bool) -> None:
    from rlef_hpc.rollout.bus import BusReceiver
    from rlef_hpc.rollout.publish import WeightFollower
    from rlef_hpc.rollout.vllm_engine import SamplingConfig, VLLMGenerator

    run = tmp / "run"
    engine = (
        Drain()
        if drain
        else VLLMGenerator(str(tmp / "hf"), SamplingConfig(max_tokens=4), kv_cache_gib=0.25)
    )
    follower = WeightFollower(engine, run, BusReceiver(run, n, 1, 600.0))
    seen = None
    while seen != last:
        version = follower.refresh()
        if version is not None and version != seen:
            seen = version
            (run / f"loaded-{n}").write_text(str(time.time()))
            (run / f"ready-{n}").write_text(str(version))
        time.sleep(0.01)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--bucket-mib", type=int, default=1024)
    p.add_argument("--repeat", type=int, default=2, help="rounds of each transport")
    p.add_argument("--role", choices=("trainer", "worker"), help=argparse.SUPPRESS)
    p.add_argument("--tmp", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    p.add_argument("--drain", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    # Alternating: every transport sees the same machine state.
    rounds = ["bus", "files"] * args.repeat
    if args.role == "trainer":
        return trainer(args.tmp, rounds, args.bucket_mib)
    if args.role == "worker":
        return worker(args.tmp, args.worker, len(rounds), args.drain)

    from rlef_hpc.checkpoint.convert import import_hf

    tmp = Path(tempfile.mkdtemp(prefix="transport-bench-"))
    hf, tokenizer = random_llama(args.hidden, args.layers)
    params = sum(t.numel() for t in hf.parameters())
    hf.save_pretrained(tmp / "hf")
    tokenizer.save_pretrained(tmp / "hf")
    del hf
    import_hf(tmp / "hf", tmp / "ckpt", value_model=False)

    gb = params * 4 / 1e9
    print(f"model: {params / 1e9:.2f}B parameters, fp32 ({gb:.1f} GB); {WORKERS} workers; ")
    print(f"{os.cpu_count()} cores; bucket {args.bucket_mib} MiB, shards of 1 GiB")
    names = {
        "bus": "weight bus (gloo over loopback)",
        "files": "files, read back from this host's page cache (one host only)",
    }
    for drain in (True, False):
        results = _rounds(tmp, args, drain)
        into = "workers that drain the stream (transport only)" if drain else "vLLM engines"
        print(f"\n| refit to 2 {into} | seconds | trainer blocked, s | GB/s per worker "
              "| trainer peak, GB |")  # fmt: skip
        print("|---|---|---|---|---|")
        for transport, name in names.items():
            mine = [r for r in results if r["transport"] == transport]
            best = min(r["seconds"] for r in mine)
            seconds = ", ".join(f"{r['seconds']:.2f}" for r in mine)
            blocked = ", ".join(f"{r['blocked']:.2f}" for r in mine)
            peak = max(r["peak"] for r in mine) / 1e9
            print(f"| {name} | {seconds} | {blocked} | {gb / best:.2f} | {peak:.2f} |")


def _rounds(tmp: Path, args: argparse.Namespace, drain: bool) -> list[dict]:
    """One trainer and the workers through every round; their results."""
    import shutil

    shutil.rmtree(tmp / "run", ignore_errors=True)
    (tmp / "run").mkdir()
    # Freed memory goes back to the kernel at once: the peak is what was held, not heap slack.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:  # the trainer's own (one-rank) group: a port free now
        s.bind(("127.0.0.1", 0))
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))
    me = [sys.executable, __file__, "--tmp", str(tmp), "--repeat", str(args.repeat)]
    me += ["--bucket-mib", str(args.bucket_mib)] + (["--drain"] if drain else [])
    names = ("trainer", *(f"w{n}" for n in range(WORKERS)))
    logs = [open(tmp / f"{name}.log", "w") for name in names]  # noqa: SIM115
    roles = [["--role", "trainer"]]
    roles += [["--role", "worker", "--worker", str(n)] for n in range(WORKERS)]
    procs = [
        subprocess.Popen([*me, *role], env=env, stdout=log, stderr=log)
        for role, log in zip(roles, logs, strict=True)
    ]
    codes = [proc.wait() for proc in procs]
    if any(codes):
        sys.exit(f"transport bench failed ({codes}); logs in {tmp}")
    return json.loads((tmp / "results.json").read_text())


if __name__ == "__main__":
    from rlef_hpc import runtime

    runtime.setup()
    runtime.setup_megatron()
    main()
