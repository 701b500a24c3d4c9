"""The RLEF training loop: where the pieces meet.

Per iteration: this rank's trajectories from the rollout source (its own engine's episodes,
or shards from rollout workers: rlef_hpc.train.sources) -> PPO (pi_old, reference, values,
then minibatch updates) -> the new policy to whoever generates next -> log; evaluate when due
(rlef_hpc.train.evaluation), checkpoint every `run.checkpoint_every`. A run directory that
holds a checkpoint is resumed from it. Runs as one process or under torchrun/srun.

A stop signal (SIGTERM, SIGUSR1, SIGUSR2) ends the run with exit status 75 and the newest
update checkpointed: after the iteration in progress, or at once during an evaluation (which
is abandoned, and redone when the run resumes).

    run_dir/
      config.yaml       the resolved config          metrics.jsonl   one record per iteration
      init/             the initial policy (HF) and tokenizer: the engine's start, the KL reference
      iter_0000004/     training checkpoints, `latest`          tensorboard/   plots/
      eval/             results.jsonl (one record per evaluated checkpoint), curve.md/png,
                        best.json (rlef_hpc.eval.results)       best/   the selected model (HF)
      problems/valid.jsonl, test.jsonl   the evaluation sets (CodeContests schema), for the
                        evaluation job
      weights/  trajectories/   disaggregated: published policy versions, trajectory shards
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, NoReturn

import torch.distributed as dist
import yaml

from rlef_hpc.checkpoint import training
from rlef_hpc.checkpoint.hf_dir import (
    TOKENIZER_FILES,
    build_from_hf,
    checkpoint_model_config,
    read_model_config,
)
from rlef_hpc.config import to_dict
from rlef_hpc.dist_env import device, init_process_groups, mean_over_ranks
from rlef_hpc.episodes import EpisodesStopped
from rlef_hpc.eval.sets import problems_path, transfer_sets
from rlef_hpc.models.gpt import sequence_multiple
from rlef_hpc.models.megatron_compat import seed
from rlef_hpc.rl.ppo import collate
from rlef_hpc.rl.update import PPOUpdate
from rlef_hpc.sandbox import Executor
from rlef_hpc.sandbox.cpus import claim_sandbox_cpus
from rlef_hpc.train.config import TrainConfig
from rlef_hpc.train.evaluation import TrainerEvaluation
from rlef_hpc.train.initial_policy import build_initial_policy
from rlef_hpc.train.metrics import (
    MetricsLog,
    SandboxCounts,
    brief,
    episode_metrics,
    plot_training,
)
from rlef_hpc.train.preemption import STOP_SIGNALS, Preempted, StopFlag
from rlef_hpc.train.problems import load_problems, load_test_problems, write_problems
from rlef_hpc.train.sources import Colocated, make_source, own_engine

# What rank 0 may do alone while the other ranks wait in a collective, besides waiting for
# trajectory shards: save a checkpoint, convert and publish the weights of a large model.
COPY_ALLOWANCE_S = 1800.0
COLLECTIVE_MARGIN_S = 600.0


def collective_timeout_s(cfg: TrainConfig) -> float:
    """How long a collective may wait for the slowest rank: the longest legitimate wait of one
    rank (rank 0 waits up to rollout.shard_timeout_s for shards, and gives up itself after
    that), plus a margin. NCCL's default, 10 minutes, aborted the job during such waits."""
    return max(cfg.rollout.shard_timeout_s, COPY_ALLOWANCE_S) + COLLECTIVE_MARGIN_S


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        from megatron.core import parallel_state as ps  # heavy: imported when a run starts
        from transformers import AutoTokenizer

        self.cfg = cfg
        p = cfg.parallel
        init_process_groups(p.tensor, p.pipeline, p.world_size, collective_timeout_s(cfg))
        self.rank = dist.get_rank()
        self.run_dir = Path(cfg.run.dir)
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        dist.barrier()
        self.log = (
            MetricsLog(self.run_dir, cfg.run.tensorboard, cfg.run.wandb_project, to_dict(cfg))
            if self.rank == 0
            else None
        )
        self.train_problems, valid_problems = load_problems(cfg)
        test_problems = load_test_problems(cfg)
        if self.rank == 0:  # for the evaluation job
            write_problems(valid_problems, problems_path(self.run_dir, "valid"))
            write_problems(test_problems, problems_path(self.run_dir, "test"))
        checkpoint = training.resume_point(self.run_dir, say=self._print)
        self.init_dir = self.run_dir / "init"
        seed(cfg.run.seed)
        # An init/ left by a run that died before its first checkpoint is reused as it is.
        if checkpoint is None and not (self.init_dir / "config.json").exists():
            build_initial_policy(cfg, self.train_problems, valid_problems, self.init_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.init_dir)
        self.model_cfg = read_model_config(self.init_dir)
        engine = own_engine(cfg, self.init_dir)  # before the models fill the GPU
        self.policy, self.reference, self.value = build_from_hf(
            self.init_dir, self.model_cfg, cfg.precision, ("policy", "policy", "value")
        )
        self.update = PPOUpdate(
            self.policy,
            self.value,
            self.reference,
            cfg.ppo,
            cfg.optim,
            temperature=cfg.rollout.temperature,
            mismatch=cfg.rollout.mismatch,
            micro_batch_tokens=cfg.update.micro_batch_tokens,
        )
        training.check_space(self.run_dir, self._checkpointed(), cfg.run.keep_last, self._print)
        self.start = 0  # the iteration the policy is at: trained and saved
        if checkpoint is not None:
            state = training.load(checkpoint, self._checkpointed(), self._schedulers())
            self.start = state["iteration"]
            self._print(f"resumed from {checkpoint} (iteration {self.start})")
        self.saved = self.start
        # Colocated, each engine group's first rank runs the episodes (lockstep; every rank at
        # TP 1): the others' sandbox idles, the leaders' takes their share of the node's CPUs.
        follower = cfg.rollout.layout == "colocated" and ps.get_tensor_model_parallel_rank() > 0
        if cfg.rollout.layout == "colocated" and not follower:
            claim_sandbox_cpus(every=p.tensor)
        self.executor = Executor(workers=1 if follower else cfg.rollout.sandbox_workers)
        self.sandbox_counts = SandboxCounts(self.executor)
        self.source = make_source(
            cfg,
            self.run_dir,
            engine,
            self.tokenizer,
            self.executor,
            self.policy,
            self.model_cfg,
            (self.train_problems, valid_problems),
            self.start,
        )
        sets = {"valid": valid_problems, "test": test_problems}
        sets.update(transfer_sets(cfg.eval.transfer, self.executor))
        # The colocated layouts evaluate on their engines here; else the evaluation job does.
        engines = self.source if isinstance(self.source, Colocated) else None
        self.evaluation = TrainerEvaluation(cfg, self.run_dir, sets, engines, self.log)
        training.start_writer_helpers(ignoring=STOP_SIGNALS)
        self.async_queue = None
        if cfg.run.async_save:
            # heavy too; only runs that save in the background need it
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self.async_queue = AsyncCallsQueue()

    def _print(self, *args: Any) -> None:
        if self.rank == 0:
            print(*args, flush=True)

    def _checkpointed(self) -> list[tuple[str, Any, Any]]:
        return [(n, t.module, t.optimizer) for n, t in self.update.trainables.items()]

    def _schedulers(self) -> dict[str, Any]:
        return {n: t.scheduler for n, t in self.update.trainables.items()}

    # --- one iteration ----------------------------------------------------------------------

    def iteration(self, it: int) -> dict[str, float]:
        trajectories, rollout = self.source.batch(it)
        stats = mean_over_ranks(episode_metrics(trajectories, self.cfg.episodes.max_turns))
        counts = self.sandbox_counts.batch(trajectories)
        start = time.perf_counter()
        self.source.before_update()
        if counts["trained_episodes"] > 0:  # a sandbox error is an empty row (ppo.collate)
            multiple = sequence_multiple(self.update.trainables["policy"].module.config)
            batch = collate(trajectories, self.tokenizer.pad_token_id or 0, device(), multiple)
            metrics = self.update.step(batch, self.cfg.update.num_minibatches, self.rank == 0)
        else:  # alike on every rank (summed counts); after_update still publishes the version
            self._print(
                f"iteration {it}: every episode ended in a sandbox error "
                f"({counts['sandbox_errors']:.0f}); nothing to train on, the update is skipped"
            )
            metrics = {"update_skipped": 1.0}
        update_s = time.perf_counter() - start
        synced = self.source.after_update(it, metrics)
        return {**stats, **counts, **metrics, **synced, **rollout, "update_seconds": update_s}

    # --- checkpoints, evaluations, stopping -------------------------------------------------

    def save(self, iteration: int, asynchronous: bool) -> None:
        if self.async_queue is not None:
            # The save in flight is committed first: a save clears temporary directories it
            # takes for killed saves', and checkpoints are committed in iteration order.
            self.async_queue.maybe_finalize_async_calls(blocking=True)
        training.save(
            self.run_dir,
            iteration,
            self._checkpointed(),
            self._schedulers(),
            {"iteration": iteration},
            keep_last=self.cfg.run.keep_last,
            model_config=checkpoint_model_config(
                self.model_cfg, self.cfg.precision.dtype, self.init_dir
            ),
            async_queue=self.async_queue if asynchronous else None,
            # The tokenizer beside the weights: the checkpoint exports to a usable HF directory.
            files=[self.init_dir / n for n in TOKENIZER_FILES if (self.init_dir / n).exists()],
            protect=self.evaluation.protected() if self.rank == 0 else (),
        )
        self.saved = iteration

    def evaluation_step(self, iteration: int, stop: StopFlag) -> None:
        """The policy at `iteration` evaluated if due and not done yet; a stop signal during it
        abandons it (every rank together) and stops the run (`stop_now`)."""
        if not self.evaluation.is_due(iteration):
            return
        with stop.during("stopping the evaluation (redone when the run resumes)"):
            try:
                self.evaluation(iteration, stop.is_set)
            except EpisodesStopped:
                self.stop_now(iteration, stop)
        self.sandbox_counts.skip()  # the evaluation's are its report's, not an iteration's
        # A signal after the evaluation's last gather: stop before another iteration starts.
        if iteration < self.cfg.run.iterations and stop.everywhere():
            self.stop_now(iteration, stop)

    def stop_now(self, iteration: int, stop: StopFlag) -> NoReturn:
        """Exit status 75 with the policy at `iteration` checkpointed (saved now unless it is;
        close() commits a save still in flight)."""
        if self.saved != iteration:
            self.save(iteration, asynchronous=False)
        self._plot()
        raise Preempted(stop.signum)

    def _plot(self) -> None:
        if self.rank == 0 and (records := self.log.records("train")):
            plot_training(records, self.run_dir / "plots", self.cfg.episodes.max_turns)

    # --- the run ----------------------------------------------------------------------------

    def run(self) -> int:
        """Trains from self.start to run.iterations; returns the last iteration."""
        last, every = self.cfg.run.iterations, self.cfg.run.checkpoint_every
        iteration = self.start
        with StopFlag(announce=self.rank == 0) as stop:
            # The initial policy (the curve's first point), or a resumed checkpoint whose due
            # evaluation a stop signal pre-empted: an evaluated checkpoint is not redone.
            self.evaluation_step(iteration, stop)
            for iteration in range(self.start + 1, last + 1):
                metrics = self.iteration(iteration)
                if self.rank == 0:
                    self.log.write("train", iteration, metrics)
                    line = brief(metrics, self.cfg.rollout.layout)
                    self._print(f"iteration {iteration}/{last}: {line}")
                stopped = stop.everywhere()
                if stopped or iteration == last or iteration % every == 0:
                    self.save(iteration, asynchronous=not stopped and iteration != last)
                if stopped:
                    self.stop_now(iteration, stop)
                self.evaluation_step(iteration, stop)
        self.source.training_done()
        self._plot()
        if self.rank == 0:
            for line in self.evaluation.report(iteration):
                self._print(line)
        return iteration

    def close(self) -> None:
        """Releases everything, once, however the run ended: the source first (nothing
        generating while the last checkpoint commits), then the saves still in flight."""
        self.source.close()
        if self.async_queue is not None:
            self.async_queue.close()
        self.executor.close()
        if self.log is not None:
            self.log.close()


def train(cfg: TrainConfig) -> int:
    """The run; returns the iteration it ended at."""
    trainer = Trainer(cfg)
    try:
        return trainer.run()
    finally:
        trainer.close()
