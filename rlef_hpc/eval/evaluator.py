"""The evaluator: the one place where a policy is evaluated, whoever generates.

`evaluate(generate, sets, metrics, ...)` walks the protocol's draws (rlef_hpc.eval.protocol),
asks `generate` for each draw's episodes and scores them (rlef_hpc.eval.report). It is all
the trainer, the Slurm evaluation job and rlef-eval call; they differ only in the `generate`
they hand in:

- the trainer's: each data-parallel rank runs its share of the draw on its own engine and the
  shares are gathered over the ranks inside the callable, so every rank runs this same code
  and its collectives match (rlef_hpc.train.evaluation);
- the evaluation job's and rlef-eval --model's: one vLLM engine of an exported checkpoint
  (rlef_hpc.eval.policy.ModelEvaluator); rlef-eval --answers: a scripted replay.

`stop` (a stop signal's flag) goes to `generate`: an evaluation asked to stop raises
EpisodesStopped within one generation batch, records nothing, and is redone from the same
seeds when the run resumes (an evaluation is idempotent per checkpoint).

`checkpoint_result` makes a run's typed record of the draws and `record` appends it to the
run's results (rlef_hpc.eval.results) and rewrites eval/curve.md, curve.png and best.json.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlef_hpc import atomic
from rlef_hpc.data.problem import Problem
from rlef_hpc.data.trajectory import Trajectory
from rlef_hpc.episodes.runner import EpisodeConfig, EpisodeRunner, GenerateFn, StopFn
from rlef_hpc.eval.plots import plot_curve
from rlef_hpc.eval.protocol import Draw, MetricSpec, draws
from rlef_hpc.eval.report import EvalReport, score
from rlef_hpc.eval.results import (
    CheckpointResult,
    Estimate,
    SamplingResult,
    Selection,
    SetResult,
    best,
    eval_dir,
    read_results,
    write_best,
    write_results,
)
from rlef_hpc.eval.tables import curve_table
from rlef_hpc.seeding import seed_sampling

# Episodes of these problems (each repeated once per rollout) sampled at (temperature, top_p),
# seeded by the key (a redone draw samples the same episodes), abandoned with EpisodesStopped
# when the stop function (None: never) says so.
Generate = Callable[[list[Problem], float, float, str, StopFn | None], list[Trajectory]]


@dataclass(frozen=True)
class DrawResult:
    draw: Draw
    report: EvalReport
    trajectories: list[Trajectory]
    seconds: float  # generating the draw's episodes


def evaluate(
    generate: Generate,
    sets: Mapping[str, Sequence[Problem]],
    metrics: Sequence[MetricSpec],
    rollouts: int,
    max_turns: int,
    tag: str = "eval",
    seed: int = 0,
    feedback: str = "real",
    stop: StopFn | None = None,
) -> list[DrawResult]:
    """Every draw of the protocol on every non-empty set, `rollouts` per problem, scored with
    bootstrap intervals seeded by `seed`. `tag` names the draws' seeds (protocol.draws);
    `feedback` names what the episodes showed after a failure (for the reports)."""
    results = []
    for draw in draws(sets, metrics, rollouts, tag):
        start = time.perf_counter()
        trajectories = generate(draw.problems, draw.temperature, draw.top_p, draw.key, stop)
        seconds = time.perf_counter() - start
        report = score(trajectories, draw.metrics, max_turns, seed, feedback=feedback)
        results.append(DrawResult(draw, report, trajectories, seconds))
    return results


def checkpoint_result(
    iteration: int, checkpoint: str, results: Sequence[DrawResult]
) -> CheckpointResult:
    """The run's record of one checkpoint's draws: per set, its samplings and every estimate
    by name with the sampling it came from."""
    sets: dict[str, SetResult] = {}
    for r in results:
        d, report = r.draw, r.report
        rate = len(r.trajectories) / r.seconds if r.seconds > 0 else None
        sampling = SamplingResult(
            d.temperature, d.top_p, report.rollouts_per_problem, report.problems,
            sorted(row.name for row in report.rows), report.skipped, report.solved_by_turn,
            r.seconds, rate, report.sandbox_errors,
        )  # fmt: skip
        result = sets.setdefault(d.set_name, SetResult(report.problems, {}, []))
        result.samplings.append(sampling)
        for row in report.rows:
            result.metrics[row.name] = Estimate(
                row.mean, row.low, row.high, row.problems, d.temperature, d.top_p
            )
    return CheckpointResult(iteration, checkpoint, sets, time.time())


def record(run_dir: str | Path, result: CheckpointResult, select: str) -> bool:
    """Adds `result` to the run's results unless its iteration is there already (an
    evaluation redone after a requeue is not counted twice), then rewrites curve.md,
    curve.png and best.json (selected by `select`). Returns whether it was added."""
    records = read_results(run_dir)
    if any(r.iteration == result.iteration for r in records):
        return False
    records = sorted([*records, result], key=lambda r: r.iteration)
    write_results(run_dir, records)
    chosen = best(records, select)
    if chosen is not None:
        write_best(run_dir, Selection(select, chosen))
    out = eval_dir(run_dir)
    atomic.write_text(out / "curve.md", curve_table(records, select) + "\n")
    plot_curve(records, out / "curve.png")
    return True


def episode_generate(
    tokenizer: Any,
    executor: Any,
    sampler: Callable[[float, float], GenerateFn],
    config: EpisodeConfig,
    seed: int,
) -> Generate:
    """A Generate over one process's policy: `sampler(temperature, top_p)` is the runner's
    generate function, sampling seeded from (`seed`, the draw's key)."""

    def generate(
        problems: list[Problem],
        temperature: float,
        top_p: float,
        key: str,
        stop: StopFn | None = None,
    ) -> list[Trajectory]:
        seed_sampling(seed, key)
        runner = EpisodeRunner(tokenizer, executor, sampler(temperature, top_p), config)
        return runner.run(problems, progress=True, stop=stop)

    return generate
