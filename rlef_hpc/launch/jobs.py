"""What each Slurm job runs: the callables tools/submit.py hands to submitit (pickled into the
run's slurm/ folder, run once per task by `srun`).

- TrainJob: the trainer (rlef_hpc.train.loop), one task per trainer rank.
- RolloutJob: one rollout worker of the disaggregated layout (a job-array task each).
- EvalJob: after training, the latest checkpoint exported to Hugging Face and evaluated (1@3 on
  the run's evaluation problems, for each of eval.feedback's modes) with vLLM.

Preemption: the trainer checkpoints at the end of the iteration on SIGTERM (scancel,
`scontrol requeue`, preemption) and on submitit's time-limit signal; for the latter, rank 0
asks Slurm to requeue the job, and the requeued job resumes from the checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlef_hpc.config import from_dict
from rlef_hpc.launch.config import JobConfig
from rlef_hpc.train.config import TrainConfig


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
        from rlef_hpc.train.loop import train
        from rlef_hpc.train.preemption import Preempted

        cfg = from_dict(JobConfig, self.config)
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
        from rlef_hpc.train.rollout_worker import install_stop_handlers, run_worker

        install_stop_handlers(_requeue_unless_sigterm)
        return run_worker(from_dict(JobConfig, self.config), self.worker)

    def checkpoint(self) -> Any:
        return _resubmission(self)


@dataclass
class EvalJob:
    config: dict[str, Any]

    def __call__(self) -> dict[str, Any]:
        return evaluate_run(from_dict(JobConfig, self.config))


def evaluate_run(cfg: TrainConfig) -> dict[str, Any]:
    """The run's latest checkpoint exported to HF (run_dir/export/iter_N) and evaluated on
    run_dir/problems/eval.jsonl as the trainer evaluates (eval.*: three turns, low
    temperature), once per feedback mode of eval.feedback (the real feedback by default); the
    report goes to run_dir/eval/job_iter_N/ (job_iter_N/MODE/ with several modes)."""
    import dataclasses

    from rlef_hpc.checkpoint import training
    from rlef_hpc.checkpoint.convert import export_hf
    from rlef_hpc.data.codecontests import load_problems
    from rlef_hpc.episodes import EpisodeConfig
    from rlef_hpc.eval.policy import evaluate_model, write_outputs
    from rlef_hpc.sandbox import Executor

    run_dir = Path(cfg.run.dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory (run.dir)")
    checkpoint = training.latest(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint to evaluate")
    export = run_dir / "export" / checkpoint.name
    if not (export / "config.json").exists():
        export_hf(checkpoint, export)
    e = cfg.eval
    episodes = EpisodeConfig(
        max_turns=e.max_turns,
        language=cfg.episodes.language,
        templates=cfg.episodes.templates,
        deterministic=len(e.feedback) > 1,  # modes compared differ only in their feedback
    )
    rollout = dataclasses.replace(cfg.rollout, temperature=e.temperature, top_p=e.top_p)
    problems = load_problems(run_dir / "problems" / "eval.jsonl")
    with Executor(workers=2) as executor:
        results = evaluate_model(
            export,
            problems,
            episodes,
            rollout,
            e.rollouts_per_problem,
            ["1@3"],
            cfg.run.seed,
            executor,
            e.feedback,
        )
    for mode, (report, _) in results.items():
        print(f"{mode} feedback:\n{report.table()}")
    write_outputs(run_dir / "eval" / f"job_{checkpoint.name}", results, e.max_turns)
    report = results[e.feedback[0]][0]
    return {**report.to_json(), "by_feedback": {m: r.to_json() for m, (r, _) in results.items()}}


def main(argv: list[str] | None = None) -> int:
    """python -m rlef_hpc.launch.jobs eval CONFIG [KEY=VALUE ...]: what slurm/eval.sh runs."""
    import argparse

    from rlef_hpc.config import load_or_exit

    p = argparse.ArgumentParser(prog="python -m rlef_hpc.launch.jobs")
    p.add_argument("job", choices=("eval",))
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = p.parse_args(argv)
    cfg = load_or_exit(p, JobConfig, args.config, args.overrides)
    try:
        evaluate_run(cfg)  # rlef-eval prints the table and writes the report
    except FileNotFoundError as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
