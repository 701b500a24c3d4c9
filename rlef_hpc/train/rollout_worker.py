"""A rollout worker of the disaggregated layout: one vLLM engine (rollout.tensor_parallel
GPUs) and a sandbox, in a job of its own, beside the trainer.

Loop: load the newest policy version (from the trainer's weight bus, or the files it
published) -> draw problems (seeded by run
seed, worker and shard number) -> run the episodes -> write them as one trajectory shard. It
waits while it is a shard or more ahead of what the trainer consumes (no point sampling from
a policy that will be stale), and exits when the trainer has finished. SIGTERM/SIGUSR1/SIGUSR2
stop it at once with status 75: the shard being written is discarded and regenerated, under the same
number and seed, by the requeued worker.

    python -m rlef_hpc.train.rollout_worker CONFIG WORKER_ID [KEY=VALUE ...]
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

# What loads torch is imported where it is used: main() sets the runtime up first.
from rlef_hpc import logs, runtime
from rlef_hpc.data.problem import Problem
from rlef_hpc.dist_env import require_gpus_where_asked
from rlef_hpc.episodes.runner import EpisodeRunner
from rlef_hpc.models.config import compute_capability
from rlef_hpc.sandbox import Executor
from rlef_hpc.sandbox.cpus import claim_sandbox_cpus

if TYPE_CHECKING:
    from rlef_hpc.train.config import TrainConfig


def shard_problems(
    cfg: TrainConfig, problems: list[Problem], worker: int, seq: int
) -> list[Problem]:
    """The problems of one shard, each repeated rollout.samples_per_problem times: block
    `seq * workers + worker` of the run's problem stream (see rlef_hpc.train.problems.draw),
    so that the workers together take every problem once per epoch, as colocated runs do."""
    from rlef_hpc.train.problems import draw

    r = cfg.rollout
    count = r.shard_rollouts // r.samples_per_problem
    first = (seq * r.workers + worker) * count
    return draw(problems, cfg.run.seed, first, count, r.samples_per_problem)


def _wait_for(what: str, ready: Any, poll_s: float, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rollout worker: waited {timeout_s:.0f} s for {what}")
        time.sleep(poll_s)


def check_worker_machine(cfg: TrainConfig) -> None:
    """The engine's FP8 (rollout.quantization) against this machine's GPU, before the worker
    waits for the trainer or builds anything (ValueError naming the key)."""
    from rlef_hpc.rollout.config import validate_rollout_hardware

    validate_rollout_hardware(cfg.rollout, compute_capability())


def run_worker(cfg: TrainConfig, worker: int, poll_s: float = 0.5) -> int:
    """Produces shards until the trainer is done; returns how many this call wrote."""
    from transformers import AutoTokenizer  # heavy: imported when a worker starts

    from rlef_hpc.rollout.bus import BusReceiver
    from rlef_hpc.rollout.publish import WeightFollower, latest_version
    from rlef_hpc.rollout.shards import ShardStore
    from rlef_hpc.rollout.vllm_engine import build_engine
    from rlef_hpc.seeding import seed_sampling
    from rlef_hpc.train.problems import load_problems

    require_gpus_where_asked()
    check_worker_machine(cfg)
    r, run_dir = cfg.rollout, Path(cfg.run.dir)
    store = ShardStore(run_dir)
    # The trainer builds init/ and publishes version `start` before it claims anything.
    _wait_for(
        f"{run_dir}/weights (is the trainer running?)",
        lambda: latest_version(run_dir) is not None,
        poll_s,
        r.shard_timeout_s,
    )
    train_problems, _ = load_problems(cfg)
    init = run_dir / "init"
    tokenizer = AutoTokenizer.from_pretrained(init)
    engine = build_engine(
        str(init), r, cfg.run.seed, cfg.precision.dtype, tensor_parallel=r.tensor_parallel
    )
    w = r.weights
    bus = BusReceiver(run_dir, worker, r.tensor_parallel, w.timeout_s)
    follower = WeightFollower(engine, run_dir, bus if w.transport == "bus" else None)
    ahead = -(-r.rollouts_per_iteration // r.shard_rollouts // max(1, r.workers)) + 1

    def generate(prompts: list[list[int]]) -> Any:
        return engine(prompts)

    written = 0
    # Unbound (several workers per node under one srun --cpu-bind=none step), each takes its
    # share of the node's CPUs; a worker Slurm bound keeps its binding.
    claim_sandbox_cpus()
    with Executor(workers=r.sandbox_workers) as executor:
        seq = store.next_seq(worker)
        while not store.done():
            if store.pending_of(worker) >= ahead:
                follower.refresh()  # idle: the next version's round finds this worker present
                time.sleep(poll_s)
                continue
            version = follower.refresh()
            assert version is not None
            # The same shard number regenerates the same episodes (a requeued worker's).
            seed_sampling(cfg.run.seed, f"worker{worker}", f"shard{seq}")
            runner = EpisodeRunner(tokenizer, executor, generate, cfg.episodes)
            trajectories = runner.run(shard_problems(cfg, train_problems, worker, seq))
            # Episodes the sandbox failed to judge go in the shard as they are (counted by the
            # trainer's metrics); the trainer does not train on them (Trajectory.trainable).
            path = store.write(worker, seq, version, trajectories)
            errors = sum(not t.trainable for t in trajectories)
            print(
                f"worker {worker}: {path.name} ({len(trajectories)} episodes, "
                f"policy version {version} from the {follower.via}; sandbox: {errors} episodes "
                f"not judged, {executor.sandbox_errors} tests errored and "
                f"{executor.worker_restarts} workers replaced so far)",
                flush=True,
            )
            seq += 1
            written += 1
    return written


def install_stop_handlers(before_exit: Callable[[int], None] | None = None) -> None:
    """SIGTERM/SIGUSR1/SIGUSR2 end the worker at once with status 75, after
    `before_exit(signum)` (a Slurm job requeues itself there)."""
    from rlef_hpc.train.preemption import EXIT_PREEMPTED, STOP_SIGNALS

    def stop(signum: int, frame: Any) -> None:
        print(f"rollout worker: {signal.Signals(signum).name}, stopping", flush=True)
        if before_exit is not None:
            before_exit(signum)
        os._exit(EXIT_PREEMPTED)  # vLLM's threads must not hold the exit; the shard is redone

    for sig in STOP_SIGNALS:
        signal.signal(sig, stop)


def main(argv: list[str] | None = None) -> int:
    runtime.setup()
    import argparse

    from rlef_hpc.config import load_or_exit
    from rlef_hpc.train.config import TrainConfig

    p = argparse.ArgumentParser(prog="rlef-rollout-worker", description=__doc__.splitlines()[0])
    p.add_argument("config", help="the run's YAML config")
    p.add_argument("worker", type=int, help="this worker's number (0, 1, ...)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--verbose", action="store_true", help="show the libraries' logs live too")
    args = p.parse_args(argv)
    cfg = load_or_exit(p, TrainConfig, args.config, args.overrides)
    try:
        check_worker_machine(cfg)
    except ValueError as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    logs.setup(Path(cfg.run.dir) / "logs", f"worker-{args.worker}", args.verbose)
    install_stop_handlers()
    run_worker(cfg, args.worker)
    return 0


if __name__ == "__main__":
    sys.exit(main())
