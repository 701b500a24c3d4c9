"""The evaluation job: the evaluator (rlef_hpc.eval.evaluator, eval.*) on a run's checkpoints,
each exported to Hugging Face and generated with vLLM on one engine (ModelEvaluator): each due
one (the initial policy, every run.eval_every iterations, the last) exactly once, results in
run_dir/eval/results.jsonl, the best on valid exported to run_dir/best/.

After training (one pass: the due checkpoints and where the run stands), or following the
checkpoints while the trainer runs, until the last iteration is evaluated or the trainer's
Slurm job has ended (then what it saved is evaluated, and the job ends too). A stop signal ends
it at once with exit status 75: the checkpoint in progress is not recorded, and the requeued
job redoes it (results.jsonl says what is done). Run by rlef_hpc.launch.jobs (EvalJob, and
`python -m rlef_hpc.launch.jobs eval` for slurm/eval.sh).
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from rlef_hpc.checkpoint import convert, retention, training
from rlef_hpc.data.problem import Problem
from rlef_hpc.episodes import EpisodeConfig, EpisodesStopped
from rlef_hpc.eval import policy
from rlef_hpc.eval.evaluator import checkpoint_result, evaluate, record
from rlef_hpc.eval.export import export_best
from rlef_hpc.eval.results import Selection, evaluated, read_best, read_results
from rlef_hpc.eval.sets import problems_path, read_run_sets, transfer_sets
from rlef_hpc.eval.tables import curve_table, numbers, summary
from rlef_hpc.launch.slurm import ended_state
from rlef_hpc.sandbox import Executor
from rlef_hpc.train.config import TrainConfig
from rlef_hpc.train.preemption import Preempted, StopFlag

Sets = Mapping[str, Sequence[Problem]]


def _model_dir(run_dir: Path, iteration: int) -> Path:
    """The HF directory of a checkpoint: init/ for iteration 0, else its export (made here)."""
    if iteration == 0:
        return run_dir / "init"
    name = training.checkpoint_name(iteration)
    export = run_dir / "export" / name
    if not (export / "config.json").exists():  # export_hf writes config.json last
        shutil.rmtree(export, ignore_errors=True)
        convert.export_hf(run_dir / name, export)
    return export


def _stopped(stop: StopFlag) -> Preempted:
    """The exception that ends the job at a stop signal: exit status 75, requeued."""
    return Preempted(stop.signum)


def _wait(seconds: float, stop: StopFlag) -> None:
    """Sleeps, but ends the job within half a second of a stop signal."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if stop.is_set():
            raise _stopped(stop)
        time.sleep(min(left, 0.5))


def _record_checkpoint(
    cfg: TrainConfig,
    run_dir: Path,
    iteration: int,
    sets: Sets,
    model: policy.ModelEvaluator,
    stop: StopFlag,
) -> None:
    """One checkpoint through the evaluator, recorded; exported to best/ if it is the best so
    far, its export deleted otherwise (an 8B export is 16 GB; the best is the one kept). A stop
    signal abandons it (recording nothing): the requeued job redoes it."""
    e = cfg.eval
    model_dir = _model_dir(run_dir, iteration)
    if stop.is_set():
        raise _stopped(stop)
    model.load(model_dir)
    try:
        draws = evaluate(
            model.generator(), sets, e.metrics, e.rollouts_per_problem, e.max_turns,
            tag=f"eval-{iteration}", seed=cfg.run.seed, stop=stop.is_set,
        )  # fmt: skip
    except EpisodesStopped:
        raise _stopped(stop) from None
    name = "init" if iteration == 0 else training.checkpoint_name(iteration)
    result = checkpoint_result(iteration, name, draws)
    record(run_dir, result, e.select_metric)
    chosen = read_best(run_dir)
    if chosen is not None and chosen.result.iteration == iteration:
        export_best(run_dir, exported=model_dir, move=iteration != 0)
    if iteration != 0:
        shutil.rmtree(model_dir, ignore_errors=True)  # moved to best/, or not the best
    rates = [s.rollouts_per_second or 0.0 for r in result.sets.values() for s in r.samplings]
    print(
        f"{time.strftime('%Y-%m-%d %H:%M:%S')} evaluated iteration {iteration}: "
        f"{numbers(result)}, {min(rates):.1f}-{max(rates):.1f} rollouts/s",
        flush=True,
    )


def _compare_feedback(
    cfg: TrainConfig, run_dir: Path, sets: Sets, model: policy.ModelEvaluator, stop: StopFlag
) -> None:
    """eval.feedback's modes on the selected model's valid set, a report each (the paper's
    feedback ablation at inference), in run_dir/eval/feedback_CHECKPOINT/MODE/."""
    e = cfg.eval
    chosen = read_best(run_dir)
    if chosen is None or not sets.get("valid"):
        return
    select = next(m for m in e.metrics if m.name == e.select_metric)
    metrics = [m for m in e.metrics if m.sampling == select.sampling]
    model.load(run_dir / "best")
    results = {}
    for mode in e.feedback:
        # Modes compared differ only in their feedback, not in batches formed by timing.
        config = dataclasses.replace(model.episode_config, feedback=mode, deterministic=True)
        try:
            [results[mode]] = evaluate(
                model.generator(config), {"valid": sets["valid"]}, metrics,
                e.rollouts_per_problem, e.max_turns, tag="feedback", seed=cfg.run.seed,
                feedback=mode, stop=stop.is_set,
            )  # fmt: skip
        except EpisodesStopped:
            raise _stopped(stop) from None
    out = run_dir / "eval" / f"feedback_{chosen.result.checkpoint}"
    policy.write_outputs(out, results, e.max_turns)


def _todo(run_dir: Path, cfg: TrainConfig, final: bool) -> list[int]:
    """The checkpoints to evaluate now, oldest first: the due ones not evaluated yet, and with
    `final` (after training, or the trainer's job has ended) also where the run stands."""
    r = cfg.run
    available = set(training.committed(run_dir))
    if (run_dir / "init" / "config.json").exists():
        available.add(0)
    done = evaluated(run_dir)
    todo = retention.pending(available, done, r.eval_every, r.iterations)
    if final and available and max(available) not in done | {*todo}:
        todo.append(max(available))
    return todo


def run(
    cfg: TrainConfig,
    follow: bool = False,
    trainer_job: str | None = None,
    poll_s: float = 30.0,
) -> Selection | None:
    """Every due checkpoint of the run not yet in eval/results.jsonl (and, after training, the
    latest one whatever its iteration), through the evaluator on one vLLM engine, oldest first.
    `follow`: then waits for the next checkpoints (every `poll_s`) until the run's last
    iteration is evaluated, or until the trainer's Slurm job `trainer_job` has ended
    (completed, failed, cancelled: then what it saved is evaluated, and the job ends); the
    trainer's retention keeps every checkpoint still to be evaluated. A stop signal ends it at
    once with exit status 75 (Preempted), recording nothing of the checkpoint in progress;
    requeued, it picks up where results.jsonl says. Returns best.json's Selection."""
    run_dir = Path(cfg.run.dir)
    if not run_dir.is_dir() and not follow:
        raise FileNotFoundError(f"{run_dir}: no such run directory (run.dir)")
    e, r = cfg.eval, cfg.run
    episode_config = EpisodeConfig(
        max_turns=e.max_turns, language=cfg.episodes.language, templates=cfg.episodes.templates
    )

    def trainer_ended() -> bool:
        """Whether the followed trainer's job has ended (said once, when seen)."""
        state = ended_state(trainer_job) if follow and trainer_job else None
        if state is not None:
            print(f"the trainer's job {trainer_job} has ended ({state}): evaluating what it saved")
        return state is not None

    response = "stopping the evaluation (the requeued job redoes it)"
    with StopFlag(announce=True, response=response) as stop:
        while follow and not problems_path(run_dir, "valid").exists():
            if trainer_ended():  # before it wrote its problems: nothing to evaluate
                return None
            _wait(poll_s, stop)  # the trainer writes the problems as it starts
        with Executor(workers=cfg.rollout.sandbox_workers) as executor:
            sets = {**read_run_sets(run_dir), **transfer_sets(e.transfer, executor)}
            model = policy.ModelEvaluator(cfg.rollout, episode_config, executor, r.seed)
            while True:
                # The trainer's state before the scan: whatever it saved is then on disk.
                ended = trainer_ended()
                todo = _todo(run_dir, cfg, final=not follow or ended)
                if not follow and not todo and not evaluated(run_dir):
                    raise FileNotFoundError(f"{run_dir}: no checkpoint to evaluate")
                for iteration in todo:
                    _record_checkpoint(cfg, run_dir, iteration, sets, model, stop)
                if not follow or ended or r.iterations in evaluated(run_dir):
                    break
                _wait(poll_s, stop)
            if set(e.feedback) != {"real"}:
                _compare_feedback(cfg, run_dir, sets, model, stop)
    records = read_results(run_dir)
    print(curve_table(records, e.select_metric))
    print(summary(records, e.select_metric), flush=True)
    return read_best(run_dir)
