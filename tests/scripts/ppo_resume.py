"""PPO updates with training checkpoints, for test_training_checkpoint (run by torchrun).

--init INIT --steps 2 --metrics OUT            uninterrupted: two updates
--init INIT --steps 1 --save RUN               one update, then a checkpoint at iteration 1
--resume RUN --steps 1 --metrics OUT           resume from RUN's latest, one more update
--init INIT --steps 1 --save RUN --hang-at 2   save iteration 1, then hang inside the save
                                               of iteration 2 (the test kills it there)
--expect-load MODE          the resume loads both models so (training.load's report)
--forbid-gather             saving fails if optimizer state is gathered onto one rank
--save-error PATH           a save that fails (CheckpointError) writes its message to PATH
                            (rank 0) and ends the run
--check-space KEEP          before training: training.check_space for run.keep_last=KEEP
--plain-optimizer           optim.distributed_optimizer=false
--dump-loaded PATH          each rank's optimizer state right after the resume, to PATH.RANK
--dump PATH                 each rank's optimizer state at the end, to PATH.RANK
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from ppo_update import BATCH, MODEL, fixed_batch

from rlef_hpc import atomic
from rlef_hpc.checkpoint import training
from rlef_hpc.checkpoint.hf_dir import CheckpointError
from rlef_hpc.checkpoint.layout import load_full_state
from rlef_hpc.models.config import PrecisionConfig
from rlef_hpc.models.gpt import build_gpt
from rlef_hpc.models.megatron_compat import seed
from rlef_hpc.rl.optim import OptimConfig
from rlef_hpc.rl.ppo import PPOConfig
from rlef_hpc.rl.update import PPOUpdate


def slow_down_policy_writes() -> None:
    """Makes the policy's background writer finish after the value's: megatron's writers
    report through one queue shared by every save in flight, so a save that took the other
    one's report would describe files it did not write (the race this order provokes)."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import (
        FileSystemWriterAsync as Writer,
    )

    write = Writer.write_preloaded_data_multiproc

    def slow(transforms, use_msc, rank, buckets, results):
        if any(f"{os.sep}policy{os.sep}" in str(bucket[0]) for bucket in buckets):
            time.sleep(3)
        return write(transforms, use_msc, rank, buckets, results)

    Writer.write_preloaded_data_multiproc = staticmethod(slow)


def forbid_gather() -> None:
    """Megatron gathers the distributed optimizer's state onto DP rank 0 (fully_reshardable,
    dp_zero_gather_scatter) in get_parameter_state_dp_zero: the parallel save must not."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    def gather(self, *args, **kwargs):
        raise AssertionError("optimizer state gathered onto one rank")

    DistributedOptimizer.get_parameter_state_dp_zero = gather


def dump(models, path: Path) -> None:
    """Each rank's optimizer state (its fp32 master weights, Adam moments and steps, groups)."""
    state = {}
    for name, _, optimizer in models:
        adam = optimizer.optimizer
        state[name] = {
            "adam": adam.state_dict(),
            "main": [p.detach().clone() for g in adam.param_groups for p in g["params"]],
        }
    torch.save(state, f"{path}.{dist.get_rank()}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--init")
    p.add_argument("--resume", type=Path)
    p.add_argument("--save", type=Path)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--metrics", type=Path)
    p.add_argument("--hang-at", type=int)
    p.add_argument("--async-save", action="store_true")
    p.add_argument("--expect-load")
    p.add_argument("--forbid-gather", action="store_true")
    p.add_argument("--save-error", type=Path)
    p.add_argument("--check-space", type=int)
    p.add_argument("--plain-optimizer", action="store_true")
    p.add_argument("--dump-loaded", type=Path)
    p.add_argument("--dump", type=Path)
    args = p.parse_args()
    dist.init_process_group("gloo")
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(args.tp, args.pp)
    seed(1234)
    per_stage = MODEL.num_layers // args.pp
    policy, value = (
        build_gpt(MODEL, PrecisionConfig()),
        build_gpt(MODEL, PrecisionConfig(), value=True),
    )
    reference = build_gpt(MODEL, PrecisionConfig())
    init = torch.load(args.init) if args.init else None
    if init is not None:
        load_full_state(policy, init["policy"], per_stage)
        load_full_state(value, init["value"], per_stage)
    update = PPOUpdate(
        policy,
        value,
        reference,
        PPOConfig(),
        OptimConfig(
            lr=1e-4, warmup_steps=3, grad_clip=1.0, distributed_optimizer=not args.plain_optimizer
        ),
    )
    models = [(name, t.module, t.optimizer) for name, t in update.trainables.items()]
    schedulers = {name: t.scheduler for name, t in update.trainables.items()}
    iteration = 0
    init_path = os.path.abspath(args.init) if args.init else None
    if args.resume:
        report = {}
        state = training.load(training.latest(args.resume), models, schedulers, report)
        if args.expect_load:
            assert report == {"policy": args.expect_load, "value": args.expect_load}, report
        if args.dump_loaded:
            dump(models, args.dump_loaded)
        iteration = state["iteration"]
        assert state["cursor"] == iteration * BATCH
        # The schedule continues where it stopped: the warm-up pre-step plus 2 per iteration.
        for scheduler in schedulers.values():
            assert scheduler.num_steps == 1 + 2 * iteration, scheduler.num_steps
        # The reference is the initial policy: stored with the run, here rebuilt from INIT.
        init_path = state["init"]
        load_full_state(reference, torch.load(init_path)["policy"], per_stage)
    elif init is not None:
        load_full_state(reference, init["policy"], per_stage)
    queue = None
    if args.async_save:
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        queue = AsyncCallsQueue()
        slow_down_policy_writes()
    if args.forbid_gather:
        forbid_gather()
    if args.check_space is not None:
        training.check_space(args.save, models, args.check_space)
    dp = dist.get_world_size() // (args.tp * args.pp)
    batch = fixed_batch()
    metrics = {}
    for _ in range(args.steps):
        iteration += 1
        # A different batch each iteration: the rewards shift with it.
        shifted = batch.select(slice(None))
        shifted.turn_reward = batch.turn_reward.roll(iteration, dims=0)
        rows = shifted.select(torch.arange(ps.get_data_parallel_rank(), BATCH, dp))
        metrics = update.step(rows, num_minibatches=2)
        if args.save:
            run_state = {"cursor": iteration * BATCH, "init": init_path}
            config = {**asdict(MODEL), "dtype": "float32"}
            try:
                training.save(
                    args.save,
                    iteration,
                    models,
                    schedulers,
                    run_state,
                    model_config=config,
                    async_queue=queue,
                )
            except CheckpointError as e:
                if args.save_error is None:
                    raise
                if dist.get_rank() == 0:
                    args.save_error.write_text(str(e))
                break
            if queue is not None:  # training goes on while the save is written
                assert not (args.save / f"iter_{iteration:07d}").exists()
    if queue is not None:
        queue.maybe_finalize_async_calls(blocking=True)
        queue.close()
    if args.hang_at:
        original = atomic.os.replace

        def slow_replace(src, dst):
            if Path(src).name.startswith(".tmp-"):
                Path(args.save, "HANGING").write_text("x")
                time.sleep(600)
            return original(src, dst)

        atomic.os.replace = slow_replace
        training.save(args.save, args.hang_at, models, schedulers, {"cursor": 0, "init": args.init})
    if args.dump:
        dump(models, args.dump)
    if args.metrics and dist.get_rank() == dist.get_world_size() - 1:
        torch.save(metrics, args.metrics)
    dist.barrier()


if __name__ == "__main__":
    from rlef_hpc import runtime

    runtime.setup()
    runtime.setup_megatron()
    main()
