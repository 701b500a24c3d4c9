"""The RLEF training loop: where the pieces meet.

Per iteration: this rank's trajectories from the rollout source (its own engine's episodes,
or shards from rollout workers: rlef_hpc.train.sources) -> PPO (pi_old, reference, values,
then minibatch updates) -> the new policy to whoever generates next -> log; evaluate every
`run.eval_every`, checkpoint every `run.checkpoint_every`. A run directory that holds a
checkpoint is resumed from it. Runs as one process or under torchrun/srun.

    run_dir/
      config.yaml       the resolved config          metrics.jsonl   one record per iteration
      init/             the initial policy (HF) and tokenizer: the engine's start, the KL reference
      iter_0000004/     training checkpoints, `latest`          tensorboard/   plots/   eval/
      problems/eval.jsonl   the evaluation problems (CodeContests schema), for eval jobs
      weights/  trajectories/   disaggregated: published policy versions, trajectory shards
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist
import yaml

from rlef_hpc.checkpoint import training
from rlef_hpc.checkpoint.hf_dir import TOKENIZER_FILES, build_from_hf, read_model_config
from rlef_hpc.config import to_dict
from rlef_hpc.dist_env import device, host_group, init_process_groups, mean_over_ranks
from rlef_hpc.eval.report import EvalReport, evaluate, plot_solve_rate
from rlef_hpc.models.gpt import sequence_multiple
from rlef_hpc.models.megatron_compat import seed
from rlef_hpc.rl.ppo import collate
from rlef_hpc.rl.update import PPOUpdate
from rlef_hpc.sandbox import Executor
from rlef_hpc.train.config import TrainConfig
from rlef_hpc.train.initial_policy import build_initial_policy
from rlef_hpc.train.metrics import MetricsLog, episode_metrics, plot_training
from rlef_hpc.train.preemption import STOP_SIGNALS, Preempted, StopFlag
from rlef_hpc.train.problems import load_problems, write_problems
from rlef_hpc.train.sources import make_source, own_engine

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
        from transformers import AutoTokenizer  # heavy, likewise

        self.cfg = cfg
        p = cfg.parallel
        init_process_groups(p.tensor, p.pipeline, p.world_size, collective_timeout_s(cfg))
        self.rank = dist.get_rank()
        self.dp_rank, self.dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
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
        self.train_problems, self.eval_problems = load_problems(cfg)
        if self.rank == 0:
            write_problems(self.eval_problems, self.run_dir / "problems" / "eval.jsonl")
        checkpoint = training.latest(self.run_dir)
        self.init_dir = self.run_dir / "init"
        seed(cfg.run.seed)
        # An init/ left by a run that died before its first checkpoint is reused as it is.
        if checkpoint is None and not (self.init_dir / "config.json").exists():
            build_initial_policy(cfg, self.train_problems, self.init_dir)
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
            micro_batch_size=cfg.update.micro_batch_size,
            temperature=cfg.rollout.temperature,
            mismatch=cfg.rollout.mismatch,
            batching=cfg.update.batching,
            micro_batch_tokens=cfg.update.micro_batch_tokens,
        )
        self.start = 0
        if checkpoint is not None:
            state = training.load(checkpoint, self._checkpointed(), self._schedulers())
            self.start = state["iteration"]
            self._print(f"resumed from {checkpoint} (iteration {self.start})")
        self.executor = Executor(workers=cfg.rollout.sandbox_workers)
        self.source = make_source(
            cfg,
            self.run_dir,
            engine,
            self.tokenizer,
            self.executor,
            self.policy,
            self.model_cfg,
            (self.train_problems, self.eval_problems),
            self.start,
        )
        training.start_writer_helpers(ignoring=STOP_SIGNALS)
        self.async_queue = None
        if cfg.run.async_save:
            # megatron, likewise; only runs that save in the background need it
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
        episodes = mean_over_ranks(episode_metrics(trajectories, self.cfg.episodes.max_turns))
        start = time.perf_counter()
        batch = collate(
            trajectories,
            pad_id=self.tokenizer.pad_token_id or 0,
            device=device(),
            multiple=sequence_multiple(self.update.trainables["policy"].module.config),
        )
        self.source.before_update()
        metrics = self.update.step(batch, self.cfg.update.num_minibatches, progress=self.rank == 0)
        update_s = time.perf_counter() - start
        synced = self.source.after_update(it, metrics)
        return {**episodes, **metrics, **synced, **rollout, "update_seconds": update_s}

    # --- evaluation and checkpoints ---------------------------------------------------------

    def evaluate(self, iteration: int, tag: str) -> EvalReport | None:
        """1@3 on the evaluation problems, always three turns with the real feedback (rank 0
        gets the report). Without an engine here, evaluation is the eval job's."""
        e = self.cfg.eval
        if not self.eval_problems or self.source.episodes is None:
            return None
        mine = [
            p
            for p in self.eval_problems[self.dp_rank :: self.dp]
            for _ in range(e.rollouts_per_problem)
        ]
        protocol = dataclasses.replace(self.cfg.episodes, max_turns=e.max_turns, feedback="real")
        trajectories = self.source.episodes(
            mine, f"eval{iteration}", e.temperature, e.top_p, episodes=protocol
        )
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, trajectories, group=host_group())
        if self.rank != 0:
            return None
        everything = [t for part in gathered for t in part]
        report = evaluate(everything, ("1@3",), e.max_turns, seed=self.cfg.run.seed)
        out = self.run_dir / "eval"
        out.mkdir(exist_ok=True)
        (out / f"{tag}.json").write_text(json.dumps(report.to_json(), indent=2))
        (out / f"{tag}.md").write_text(report.table() + "\n")
        plot_solve_rate(everything, out / f"{tag}.png", e.max_turns, title=tag)
        row = report.rows[0]
        values = {"1@3": row.mean, "1@3_low": row.low, "1@3_high": row.high}
        values.update({f"solved_by_turn_{k + 1}": v for k, v in enumerate(report.solved_by_turn)})
        self.log.write("eval", iteration, values)
        return report

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
            model_config={**dataclasses.asdict(self.model_cfg), "dtype": self.cfg.precision.dtype},
            async_queue=self.async_queue if asynchronous else None,
            # The tokenizer beside the weights: the checkpoint exports to a usable HF directory.
            files=[self.init_dir / n for n in TOKENIZER_FILES if (self.init_dir / n).exists()],
        )

    # --- the run ----------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        iteration = self.start
        with StopFlag(announce=self.rank == 0) as stop_flag:
            before = self.evaluate(0, "before") if self.start == 0 else None
            for iteration in range(self.start + 1, cfg.run.iterations + 1):
                metrics = self.iteration(iteration)
                if self.rank == 0:
                    self.log.write("train", iteration, metrics)
                    self._print(f"iteration {iteration}/{cfg.run.iterations}: {brief(metrics)}")
                stop = stop_flag.everywhere()
                last = iteration == cfg.run.iterations
                if stop or last or iteration % cfg.run.checkpoint_every == 0:
                    self.save(iteration, asynchronous=not stop and not last)
                if stop:
                    self._finish()
                    raise Preempted(stop_flag.signum)
                if cfg.run.eval_every and iteration % cfg.run.eval_every == 0 and not last:
                    self.evaluate(iteration, f"iter_{iteration:07d}")
            after = self.evaluate(iteration, "after")
        self._finish()
        self.source.finish()
        if self.rank == 0:
            self._print(summary_table(before, after))
        return {"iterations": iteration, "before": before, "after": after}

    def _finish(self) -> None:
        self.source.close()  # nothing generating while the last checkpoint commits
        if self.async_queue is not None:
            self.async_queue.maybe_finalize_async_calls(blocking=True)
        if self.rank == 0:
            records = self.log.records("train")
            if records:
                plot_training(records, self.run_dir / "plots", self.cfg.episodes.max_turns)

    def close(self) -> None:
        self.source.close()
        self.executor.close()
        if self.async_queue is not None:
            self.async_queue.close()
        if self.log is not None:
            self.log.close()


def brief(m: dict[str, float]) -> str:
    if "generated_tokens_per_second" in m:
        rollout = (
            f"rollout {m['rollout_seconds']:.1f}s ({m['generated_tokens_per_second']:.0f} tok/s)"
        )
    else:
        rollout = f"waited {m['rollout_seconds']:.1f}s for shards"
    return (
        f"reward {m['reward_mean']:+.3f}, solved {100 * m['success_rate']:.1f}%, "
        f"kl {m.get('kl', 0.0):.4f}, mismatch {m.get('mismatch_max', 0.0):.2e}, "
        f"{rollout}, update {m['update_seconds']:.1f}s"
    )


def summary_table(before: EvalReport | None, after: EvalReport | None) -> str:
    lines = ["| policy | 1@3 | 95% CI | solved by turn 1 / 2 / 3 |", "|---|---|---|---|"]
    for name, report in (("before RLEF", before), ("after RLEF", after)):
        if report is None:
            continue
        row = report.rows[0]
        turns = " / ".join(f"{100 * v:.1f}%" for v in report.solved_by_turn)
        lines.append(
            f"| {name} | {100 * row.mean:.1f}% | [{100 * row.low:.1f}, {100 * row.high:.1f}] "
            f"| {turns} |"
        )
    return "\n".join(lines)


def train(cfg: TrainConfig) -> dict[str, Any]:
    trainer = Trainer(cfg)
    try:
        return trainer.run()
    finally:
        trainer.close()
