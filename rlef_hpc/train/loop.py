"""The RLEF training loop: where the pieces meet.

Per iteration: this rank's trajectories from the rollout source (its own engine's episodes,
or shards from rollout workers: rlef_hpc.train.sources) -> PPO (pi_old, reference, values,
then minibatch updates) -> the new policy to whoever generates next -> log; evaluate every
`run.eval_every`, checkpoint every `run.checkpoint_every`. A run directory that holds a
checkpoint is resumed from it. Runs as one process or under torchrun/srun.

    run_dir/
      config.yaml       the resolved config          metrics.jsonl   one record per iteration
      init/             the initial policy (HF) and tokenizer: the engine's start, the KL reference
      iter_0000004/     training checkpoints, `latest`          tensorboard/   plots/
      eval/             results.jsonl (one record per evaluated checkpoint), curve.md/png,
                        best.json (rlef_hpc.eval.protocol)      best/   the selected model (HF)
      problems/eval.jsonl, test.jsonl   valid and test problems (CodeContests schema), for
                        the evaluation job
      weights/  trajectories/   disaggregated: published policy versions, trajectory shards
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

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
from rlef_hpc.dist_env import device, host_group, init_process_groups, mean_over_ranks
from rlef_hpc.eval import protocol
from rlef_hpc.models.gpt import sequence_multiple
from rlef_hpc.models.megatron_compat import seed
from rlef_hpc.rl.ppo import collate
from rlef_hpc.rl.update import PPOUpdate
from rlef_hpc.sandbox import Executor
from rlef_hpc.train.config import TrainConfig
from rlef_hpc.train.initial_policy import build_initial_policy
from rlef_hpc.train.metrics import MetricsLog, episode_metrics, plot_training
from rlef_hpc.train.preemption import STOP_SIGNALS, Preempted, StopFlag
from rlef_hpc.train.problems import load_problems, load_test_problems, write_problems
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
        test_problems = load_test_problems(cfg)
        if self.rank == 0:
            write_problems(self.eval_problems, self.run_dir / "problems" / "eval.jsonl")
            write_problems(test_problems, self.run_dir / "problems" / "test.jsonl")
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
        self.eval_sets = {
            "valid": self.eval_problems,
            "test": test_problems,
            **protocol.transfer_sets(cfg.eval.transfer, self.executor),
        }
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

    def evaluate(self, iteration: int) -> dict[str, Any] | None:
        """The evaluation protocol (eval.*, rlef_hpc.eval.protocol) on every evaluation set at
        this iteration's policy, always with the real feedback, appended to eval/results.jsonl
        (rank 0 returns the record). An iteration already there is not redone. Without an
        engine here (the disaggregated layout) the evaluation job does it."""
        e = self.cfg.eval
        if not any(self.eval_sets.values()) or self.source.episodes is None:
            return None
        if iteration in protocol.evaluated(self.run_dir):
            return None
        episodes = dataclasses.replace(self.cfg.episodes, max_turns=e.max_turns, feedback="real")

        def generate(problems: list[Any], temperature: float, top_p: float, key: str) -> Any:
            mine = self.source.episodes(
                problems[self.dp_rank :: self.dp], key, temperature, top_p, episodes=episodes
            )
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, mine, group=host_group())
            return [t for part in gathered for t in part]

        if self.rank != 0:  # its share of every draw, in the order rank 0 gathers them
            for draw in protocol.draws(
                self.eval_sets, e.metrics, e.rollouts_per_problem, iteration
            ):
                generate(draw.problems, draw.temperature, draw.top_p, draw.key)
            return None
        name = "init" if iteration == 0 else training.checkpoint_name(iteration)
        record = protocol.evaluate_checkpoint(
            generate, self.eval_sets, e.metrics, e.rollouts_per_problem, e.max_turns,
            iteration, name, seed=self.cfg.run.seed,
        )  # fmt: skip
        protocol.append_result(self.run_dir, record, e.select_metric)
        self.log.write("eval", iteration, eval_values(record, e.select_metric))
        return record

    def _protected(self) -> set[int]:
        """Checkpoints retention keeps beyond run.keep_last: still to be evaluated (here or by
        the evaluation job), or the best on valid so far."""
        if not any(self.eval_sets.values()):
            return set()
        r = self.cfg.run
        checkpoints = training.committed(self.run_dir)
        return protocol.protected(
            self.run_dir, checkpoints, r.eval_every, r.iterations, self.cfg.eval.select_metric
        )

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
            protect=self._protected() if self.rank == 0 else (),
        )

    # --- the run ----------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        iteration = self.start
        with StopFlag(announce=self.rank == 0) as stop_flag:
            # The initial policy (the curve's first point), or a resumed checkpoint whose due
            # evaluation a stop signal pre-empted: evaluate() skips what is already recorded.
            if protocol.is_due(self.start, cfg.run.eval_every, cfg.run.iterations):
                self.evaluate(self.start)
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
                if protocol.is_due(iteration, cfg.run.eval_every, cfg.run.iterations):
                    self.evaluate(iteration)
        self._finish()
        self.source.finish()
        records = protocol.read_results(self.run_dir)
        if self.rank == 0 and records:
            self._print(summary_table(records, iteration))
            if self.source.episodes is not None:  # else the evaluation job selects and exports
                best = protocol.export_best(self.run_dir)
                self._print(f"{protocol.summary(records, cfg.eval.select_metric)}; HF: {best}")
        return {"iterations": iteration, "evaluations": records}

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


def eval_values(record: dict[str, Any], select: str) -> dict[str, float]:
    """An evaluation record as metrics.jsonl's numbers: SET/METRIC (and _low, _high) for every
    set, the valid set's also without the prefix, and solved_by_turn_T of the valid rollouts
    sampled as the selection metric is (plots/solve_rate.png)."""
    values = {}
    for name, result in record["sets"].items():
        for metric, row in result["metrics"].items():
            prefixes = (f"{name}/", "") if name == protocol.SELECTION_SET else (f"{name}/",)
            for key in (f"{prefix}{metric}" for prefix in prefixes):
                values.update(
                    {key: row["mean"], f"{key}_low": row["low"], f"{key}_high": row["high"]}
                )
    valid = record["sets"].get(protocol.SELECTION_SET)
    if valid is not None:
        sampling = next((s for s in valid["samplings"] if select in s["metrics"]), None)
        for k, v in enumerate(sampling["solved_by_turn"] if sampling else []):
            values[f"solved_by_turn_{k + 1}"] = v
    return values


def summary_table(records: list[dict[str, Any]], last: int) -> str:
    """Before and after RLEF, every set and metric (the whole curve: eval/curve.md)."""
    ends = [r for r in records if r["iteration"] in (0, last)]
    labels = {0: "before RLEF", last: f"after RLEF ({last})"}
    return protocol.curve_table(ends, select=None, labels=labels)


def train(cfg: TrainConfig) -> dict[str, Any]:
    trainer = Trainer(cfg)
    try:
        return trainer.run()
    finally:
        trainer.close()
