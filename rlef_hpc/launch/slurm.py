"""The few Slurm commands the launcher runs itself (submitit does the submitting)."""

from __future__ import annotations

import os
import shutil
import subprocess

# What submitting needs on this host: sbatch submits, submitit refuses to start without srun,
# scontrol asks the controller.
SLURM_COMMANDS = ("sbatch", "srun", "scontrol")


class SlurmUnavailable(RuntimeError):
    pass


def require_slurm(timeout: float = 15.0) -> None:
    """Raises SlurmUnavailable, saying why, unless Slurm's commands exist and the controller
    answers."""
    missing = [cmd for cmd in SLURM_COMMANDS if shutil.which(cmd) is None]
    if missing:
        names = ", ".join(f"`{cmd}`" for cmd in missing)
        raise SlurmUnavailable(f"Slurm is not installed here: no {names} on PATH")
    try:
        proc = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SlurmUnavailable(f"the Slurm controller does not answer: {e}") from None
    if proc.returncode != 0 or "UP" not in proc.stdout:
        where = os.environ.get("SLURM_CONF", "the default slurm.conf")
        text = (proc.stdout + proc.stderr).strip().splitlines()
        raise SlurmUnavailable(
            f"the Slurm controller is not reachable ({where}): {text[-1] if text else 'no answer'}"
        )


def job_states(job_ids: list[str]) -> dict[str, str]:
    """Job id -> state (PENDING, RUNNING, COMPLETED, ...), from accounting, else from squeue."""
    if not job_ids:
        return {}
    ids = ",".join(job_ids)
    states: dict[str, str] = {}
    for line in _output(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ids]):
        job, _, state = line.partition("|")
        if job:
            states[job] = state.split()[0] if state else "UNKNOWN"
    if not states:
        for line in _output(["squeue", "-h", "-o", "%i|%T", "-j", ids]):
            job, _, state = line.partition("|")
            states[job] = state
    return states


# The states of a job that will not run again (a requeued job is REQUEUED, then PENDING).
ENDED_STATES = frozenset(
    {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
     "PREEMPTED", "TIMEOUT"}
)  # fmt: skip


def ended_state(job_id: str) -> str | None:
    """The job's final state once it has ended (COMPLETED, FAILED, CANCELLED, ...); None while
    it is pending, running or requeued, or when Slurm cannot tell (a job unknown to sacct and
    already gone from squeue is taken as not ended: a wrong answer here would end an
    evaluation early, the other one only late)."""
    state = job_states([job_id]).get(job_id)
    return state if state in ENDED_STATES else None


def _output(cmd: list[str]) -> list[str]:
    """The command's output lines; none if it is not installed (a cluster without accounting
    has no sacct: squeue then answers)."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True).stdout.splitlines()
    except OSError:
        return []
