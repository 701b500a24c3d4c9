"""The trainer's evaluations: the evaluator (rlef_hpc.eval.evaluator) on the trainer's own
engines, before training, every `run.eval_every` iterations and at the end, on the valid, test
and eval.transfer sets, always with three turns of the real feedback (eval.max_turns), however
training runs its episodes. Rank 0 records the results (run_dir/eval/) and logs them.

Every rank runs the same code: the generate handed to the evaluator runs this data-parallel
rank's share of each draw on its engine, and gathers the shares of all ranks (one collective
per draw, on every rank). A stop signal abandons the draw on the rank that saw it; the ranks
learn it at that draw's gather, and all raise EpisodesStopped together.

In the disaggregated layout the trainer has no engine: the evaluation job evaluates its
checkpoints (rlef_hpc.launch.jobs), and the trainer only keeps them for it (`protected`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch.distributed as dist

from rlef_hpc.checkpoint import retention, training
from rlef_hpc.data.problem import Problem
from rlef_hpc.data.trajectory import Trajectory
from rlef_hpc.dist_env import host_group
from rlef_hpc.episodes import EpisodesStopped, StopFn
from rlef_hpc.eval.evaluator import checkpoint_result, evaluate, record
from rlef_hpc.eval.export import export_best
from rlef_hpc.eval.results import best, read_results
from rlef_hpc.eval.tables import before_after, summary
from rlef_hpc.train.config import TrainConfig
from rlef_hpc.train.metrics import MetricsLog
from rlef_hpc.train.sources import Colocated


class TrainerEvaluation:
    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: Path,
        sets: Mapping[str, Sequence[Problem]],
        engines: Colocated | None,
        log: MetricsLog | None,
    ) -> None:
        """`engines`: the source whose engines evaluate here (colocated layouts), None where
        the evaluation job does. `log`: rank 0's."""
        self.cfg, self.run_dir, self.sets, self.engines, self.log = cfg, run_dir, sets, engines, log
        self.rank = dist.get_rank()
        # Read once, by every rank, before any evaluation of this process is recorded: whether
        # an evaluation is done is then the same answer on every rank.
        self.done = {r.iteration for r in read_results(run_dir)}
        self.episode_config = dataclasses.replace(
            cfg.episodes, max_turns=cfg.eval.max_turns, feedback="real"
        )

    def is_due(self, iteration: int) -> bool:
        return retention.is_due(iteration, self.cfg.run.eval_every, self.cfg.run.iterations)

    def __call__(self, iteration: int, stop: StopFn) -> None:
        """The policy at `iteration` through the protocol, unless evaluated already or nobody
        evaluates here. Raises EpisodesStopped on every rank when a rank was signalled; nothing
        of it is recorded then."""
        if self.engines is None or not any(self.sets.values()) or iteration in self.done:
            return
        e = self.cfg.eval
        if self.rank == 0:
            names = ", ".join(name for name, problems in self.sets.items() if problems)
            print(f"evaluating iteration {iteration} on {names}", flush=True)
        draws = evaluate(
            self._generate, self.sets, e.metrics, e.rollouts_per_problem, e.max_turns,
            tag=f"eval-{iteration}", seed=self.cfg.run.seed, stop=stop,
        )  # fmt: skip
        self.done.add(iteration)
        if self.rank == 0:
            name = "init" if iteration == 0 else training.checkpoint_name(iteration)
            result = checkpoint_result(iteration, name, draws)
            record(self.run_dir, result, e.select_metric)
            assert self.log is not None
            self.log.write("eval", iteration, result.values(e.select_metric))

    def _generate(
        self,
        problems: list[Problem],
        temperature: float,
        top_p: float,
        key: str,
        stop: StopFn | None = None,
    ) -> list[Trajectory]:
        """This rank's share of the draw on its engine, then every rank's, gathered."""
        engines = self.engines
        assert engines is not None
        mine: list[Trajectory] | None
        try:
            mine = engines.run_episodes(
                problems[engines.dp_rank :: engines.dp], key, temperature, top_p,
                config=self.episode_config, stop=stop,
            )  # fmt: skip
        except EpisodesStopped:
            mine = None  # still at the gather: the other ranks wait there
        gathered: list[list[Trajectory] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine, group=host_group())
        if any(part is None for part in gathered):
            raise EpisodesStopped("a stop signal during the evaluation")
        return [t for part in gathered if part is not None for t in part]

    def protected(self) -> set[int]:
        """Checkpoints retention keeps beyond run.keep_last: still to be evaluated (here or by
        the evaluation job), or the best on valid so far."""
        if not any(self.sets.values()):
            return set()
        r = self.cfg.run
        return protected(self.run_dir, self.cfg.eval.select_metric, r.eval_every, r.iterations)

    def report(self, last: int) -> list[str]:
        """Rank 0's closing lines: before and after RLEF on every set, and the selected
        checkpoint, exported to run_dir/best (here; in the disaggregated layout the
        evaluation job selects and exports)."""
        records = read_results(self.run_dir)
        if not records:
            return []
        lines = [before_after(records, last)]
        if self.engines is not None:
            exported = export_best(self.run_dir)
            lines.append(f"{summary(records, self.cfg.eval.select_metric)}; HF: {exported}")
        return lines


def protected(run_dir: Path, select: str, eval_every: int, last: int) -> set[int]:
    """The run's checkpoints retention keeps beyond run.keep_last, as its results stand."""
    records = read_results(run_dir)
    chosen = best(records, select)
    return retention.protected(
        training.committed(run_dir), [r.iteration for r in records],
        chosen.iteration if chosen else None, eval_every, last,
    )  # fmt: skip
