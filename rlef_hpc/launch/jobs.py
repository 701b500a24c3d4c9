"""What each Slurm job runs: the callables tools/submit.py hands to submitit (pickled into the
run's slurm/ folder, run once per task by `srun`).

- TrainJob: the trainer (rlef_hpc.train.loop), one task per trainer rank.
- RolloutJob: one rollout worker of the disaggregated layout (a job-array task each).
- EvalJob: the evaluation job (rlef_hpc.launch.eval_job) on the run's checkpoints: after
  training (afterok), or following the checkpoints while the trainer runs (follow=True: the
  disaggregated layout, where the trainer has no engine to evaluate with).

Preemption: on SIGTERM (scancel, `scontrol requeue`, preemption) and on submitit's time-limit
signal, the trainer checkpoints at the end of the iteration, or at once during an evaluation,
and the evaluation job stops the evaluation in progress at once (what is recorded stays; the
rest is redone). For the time-limit signal, rank 0 asks Slurm to requeue the job, and the
requeued job resumes from where it stopped.
"""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass
from typing import Any

from rlef_hpc import runtime
from rlef_hpc.config import from_dict
from rlef_hpc.launch.config import JobConfig
from rlef_hpc.train.config import check_machine


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
            last = train(cfg)
        except Preempted as stop:
            if os.environ.get("SLURM_PROCID", "0") == "0":
                _requeue_unless_sigterm(stop.signum or signal.SIGTERM)
            raise
        return {"iterations": last}

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
    trainer_job: str | None = None  # follow: the trainer's job, whose end ends the wait

    def __call__(self) -> dict[str, Any]:
        runtime.setup()
        runtime.setup_megatron()  # checkpoints are exported to HF through megatron models
        from rlef_hpc.launch import eval_job
        from rlef_hpc.train.preemption import Preempted

        cfg = from_dict(JobConfig, self.config)
        try:
            selection = eval_job.run(cfg, follow=self.follow, trainer_job=self.trainer_job)
        except Preempted as stop:
            _requeue_unless_sigterm(stop.signum or signal.SIGTERM)
            raise
        return {"best": selection.result.iteration if selection else None}

    def checkpoint(self) -> Any:  # requeued: results.jsonl says what is already done
        return _resubmission(self)


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
    p.add_argument(
        "--trainer-job",
        metavar="JOB_ID",
        help="with --follow: the trainer's Slurm job; once it has ended, evaluate what it saved "
        "and stop",
    )
    args = p.parse_args(argv)
    cfg = load_or_exit(p, JobConfig, args.config, args.overrides)
    runtime.setup_megatron()  # checkpoints are exported to HF through megatron models
    from rlef_hpc.data.codecontests import ProblemFormatError

    try:
        from rlef_hpc.launch import eval_job

        # prints the curve and the selected checkpoint; a stop signal: exit status 75
        eval_job.run(cfg, follow=args.follow, trainer_job=args.trainer_job)
    except (FileNotFoundError, ProblemFormatError) as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
