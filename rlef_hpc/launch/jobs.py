"""What each Slurm job runs: the callables tools/submit.py hands to submitit (pickled into the
run's slurm/ folder, run once per task by `srun`).

- TrainJob: the trainer (rlef_hpc.train.loop), one task per trainer rank.
- RolloutJob: one rollout worker of the disaggregated layout (a job-array task each).
- EvalJob: the evaluation protocol (eval.*, rlef_hpc.eval.protocol) on the run's checkpoints,
  exported to Hugging Face and evaluated with vLLM: each due one (the initial policy, every
  run.eval_every iterations, the last) exactly once, results in run_dir/eval/results.jsonl, the
  best on valid exported to run_dir/best/. After training (afterok), or, following the
  checkpoints while the trainer runs (follow=True: the disaggregated layout, where the trainer
  has no engine to evaluate with), until the last iteration is evaluated.

Preemption: the trainer checkpoints at the end of the iteration on SIGTERM (scancel,
`scontrol requeue`, preemption) and on submitit's time-limit signal; for the latter, rank 0
asks Slurm to requeue the job, and the requeued job resumes from the checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlef_hpc import runtime
from rlef_hpc.config import from_dict
from rlef_hpc.launch.config import JobConfig
from rlef_hpc.train.config import TrainConfig, check_machine


def requeue_this_job() -> None:
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        subprocess.run(["scontrol", "requeue", job], check=False)


def _requeue_unless_sigterm(signum: int) -> None:
    """A time-limit warning (submitit's SIGUSR2): run again. On SIGTERM Slurm is already
    requeueing or cancelling the job."""
    if signum != signal.SIGTERM:
        requeue_this_job()


def _resubmission(job: Any) -> Any:
    import submitit

    return submitit.helpers.DelayedSubmission(job)


@dataclass
class TrainJob:
    config: dict[str, Any]

    def __call__(self) -> dict[str, Any]:
        runtime.setup()
        from rlef_hpc.train.loop import train
        from rlef_hpc.train.preemption import Preempted

        cfg = from_dict(JobConfig, self.config)
        check_machine(cfg)  # before anything is built: FP8 against this node's GPU
        runtime.setup_megatron()
        try:
            result = train(cfg)
        except Preempted as stop:
            if os.environ.get("SLURM_PROCID", "0") == "0":
                _requeue_unless_sigterm(stop.signum or signal.SIGTERM)
            raise
        return {"iterations": result["iterations"]}

    def checkpoint(self) -> Any:  # submitit's preemption hook: resuming is automatic
        return _resubmission(self)


@dataclass
class RolloutJob:
    config: dict[str, Any]
    worker: int

    def __call__(self) -> int:
        runtime.setup()
        from rlef_hpc.train.rollout_worker import install_stop_handlers, run_worker

        install_stop_handlers(_requeue_unless_sigterm)
        return run_worker(from_dict(JobConfig, self.config), self.worker)

    def checkpoint(self) -> Any:
        return _resubmission(self)


@dataclass
class EvalJob:
    config: dict[str, Any]
    follow: bool = False

    def __call__(self) -> dict[str, Any]:
        runtime.setup()
        runtime.setup_megatron()  # checkpoints are exported to HF through megatron models
        return evaluate_run(from_dict(JobConfig, self.config), follow=self.follow)

    def checkpoint(self) -> Any:  # requeued: results.jsonl says what is already done
        return _resubmission(self)


def _eval_sets(cfg: TrainConfig, run_dir: Path, executor: Any) -> dict[str, list[Any]]:
    """The sets the trainer wrote to run_dir/problems/ (valid, test), and eval.transfer's."""
    from rlef_hpc.data.codecontests import load_problems
    from rlef_hpc.eval.protocol import transfer_sets

    problems = run_dir / "problems"
    sets = {
        name: load_problems(problems / f"{file}.jsonl")
        for name, file in (("valid", "eval"), ("test", "test"))
        if (problems / f"{file}.jsonl").exists()
    }
    return {**sets, **transfer_sets(cfg.eval.transfer, executor)}


def _model_dir(run_dir: Path, iteration: int) -> Path:
    """The HF directory of a checkpoint: init/ for iteration 0, else its export (made here)."""
    from rlef_hpc.checkpoint import training
    from rlef_hpc.checkpoint.convert import export_hf

    if iteration == 0:
        return run_dir / "init"
    name = training.checkpoint_name(iteration)
    export = run_dir / "export" / name
    if not (export / "config.json").exists():  # export_hf writes config.json last
        shutil.rmtree(export, ignore_errors=True)
        export_hf(run_dir / name, export)
    return export


def _evaluate_one(
    cfg: TrainConfig, run_dir: Path, iteration: int, sets: Any, evaluator: Any
) -> None:
    """One checkpoint through the protocol, recorded; exported to best/ if it is the best so far,
    its export deleted otherwise (an 8B export is 16 GB; the best is the one kept)."""
    from rlef_hpc.checkpoint import training
    from rlef_hpc.eval import protocol

    e = cfg.eval
    model = _model_dir(run_dir, iteration)
    evaluator.load(model)
    name = "init" if iteration == 0 else training.checkpoint_name(iteration)
    record = protocol.evaluate_checkpoint(
        evaluator.generate, sets, e.metrics, e.rollouts_per_problem, e.max_turns, iteration,
        name, seed=cfg.run.seed,
    )  # fmt: skip
    protocol.append_result(run_dir, record, e.select_metric)
    chosen = protocol.read_best(run_dir)
    if chosen is not None and chosen["iteration"] == iteration:
        protocol.export_best(run_dir, exported=model, move=iteration != 0)
    if iteration != 0:
        shutil.rmtree(model, ignore_errors=True)  # moved to best/, or not the best
    rates = [
        s["rollouts_per_second"] or 0.0 for r in record["sets"].values() for s in r["samplings"]
    ]
    print(
        f"{time.strftime('%Y-%m-%d %H:%M:%S')} evaluated iteration {iteration}: "
        f"{protocol.summary([record], e.select_metric).split(': ', 1)[1]}, "
        f"{min(rates):.1f}-{max(rates):.1f} rollouts/s",
        flush=True,
    )


def _compare_feedback(cfg: TrainConfig, run_dir: Path, sets: Any, evaluator: Any) -> None:
    """eval.feedback's modes on the selected model's valid set, a report each (the paper's
    feedback ablation at inference), in run_dir/eval/feedback_CHECKPOINT/MODE/."""
    from rlef_hpc.eval import protocol
    from rlef_hpc.eval.policy import evaluate_modes, write_outputs

    e = cfg.eval
    chosen = protocol.read_best(run_dir)
    if chosen is None or not sets.get("valid"):
        return
    select = next(m for m in e.metrics if m.name == e.select_metric)
    evaluator.load(run_dir / "best")
    names = protocol.by_sampling(e.metrics)[select.sampling]
    engine = evaluator.engine

    def policy() -> Any:
        return functools.partial(engine, temperature=select.temperature, top_p=select.top_p)

    repeated = [p for p in sets["valid"] for _ in range(e.rollouts_per_problem)]
    # Modes compared differ only in their feedback, not in batches formed by timing.
    episodes = dataclasses.replace(evaluator.episodes, deterministic=True)
    results = evaluate_modes(
        evaluator.tokenizer, policy, repeated, episodes, e.feedback, names, cfg.run.seed,
        evaluator.executor,
    )  # fmt: skip
    write_outputs(run_dir / "eval" / f"feedback_{chosen['checkpoint']}", results, e.max_turns)


def evaluate_run(cfg: TrainConfig, follow: bool = False, poll_s: float = 30.0) -> dict[str, Any]:
    """The evaluation job: every due checkpoint of the run not yet in eval/results.jsonl (and,
    after training, the latest one whatever its iteration), through the protocol on one vLLM
    engine, oldest first. `follow`: then waits for the next checkpoints (every `poll_s`) until
    the run's last iteration is evaluated; the trainer's retention keeps every checkpoint still
    to be evaluated. Requeued, it picks up where results.jsonl says. Returns best.json."""
    from rlef_hpc.checkpoint import training
    from rlef_hpc.episodes import EpisodeConfig
    from rlef_hpc.eval import protocol
    from rlef_hpc.eval.policy import ModelEvaluator
    from rlef_hpc.sandbox import Executor

    run_dir = Path(cfg.run.dir)
    if not run_dir.is_dir() and not follow:
        raise FileNotFoundError(f"{run_dir}: no such run directory (run.dir)")
    e, r = cfg.eval, cfg.run
    episodes = EpisodeConfig(
        max_turns=e.max_turns, language=cfg.episodes.language, templates=cfg.episodes.templates
    )
    while follow and not (run_dir / "problems" / "eval.jsonl").exists():
        time.sleep(poll_s)  # the trainer writes the problems as it starts
    with Executor(workers=cfg.rollout.sandbox_workers) as executor:
        sets = _eval_sets(cfg, run_dir, executor)
        evaluator = ModelEvaluator(cfg.rollout, episodes, executor, r.seed)
        while True:
            available = set(training.committed(run_dir))
            if (run_dir / "init" / "config.json").exists():
                available.add(0)
            done = protocol.evaluated(run_dir)
            todo = protocol.pending(available, done, r.eval_every, r.iterations)
            if not follow:  # after training (one pass): also where a run stopped early stands
                todo += [i for i in available if i == max(available) and i not in done | {*todo}]
                if not todo and not done:
                    raise FileNotFoundError(f"{run_dir}: no checkpoint to evaluate")
            for iteration in todo:
                _evaluate_one(cfg, run_dir, iteration, sets, evaluator)
            if not follow or r.iterations in protocol.evaluated(run_dir):
                break
            time.sleep(poll_s)
        if set(e.feedback) != {"real"}:
            _compare_feedback(cfg, run_dir, sets, evaluator)
    records = protocol.read_results(run_dir)
    print(protocol.curve_table(records, e.select_metric))
    print(protocol.summary(records, e.select_metric), flush=True)
    return protocol.read_best(run_dir) or {}


def main(argv: list[str] | None = None) -> int:
    """python -m rlef_hpc.launch.jobs eval CONFIG [KEY=VALUE ...]: what slurm/eval.sh runs."""
    runtime.setup()
    import argparse

    from rlef_hpc.config import load_or_exit

    p = argparse.ArgumentParser(prog="python -m rlef_hpc.launch.jobs")
    p.add_argument("job", choices=("eval",))
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument(
        "--follow", action="store_true", help="evaluate checkpoints as training writes them"
    )
    args = p.parse_args(argv)
    cfg = load_or_exit(p, JobConfig, args.config, args.overrides)
    runtime.setup_megatron()  # checkpoints are exported to HF through megatron models
    from rlef_hpc.data.codecontests import ProblemFormatError

    try:
        evaluate_run(cfg, follow=args.follow)  # prints the curve and the selected checkpoint
    except (FileNotFoundError, ProblemFormatError) as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
