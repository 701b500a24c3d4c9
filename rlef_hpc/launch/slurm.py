"""The few Slurm commands the launcher runs itself (submitit does the submitting)."""

from __future__ import annotations

import os
import shutil
import subprocess


class SlurmUnavailable(RuntimeError):
    pass


def require_slurm(timeout: float = 15.0) -> None:
    """Raises SlurmUnavailable, saying why, unless sbatch exists and the controller answers."""
    if shutil.which("sbatch") is None:
        raise SlurmUnavailable("Slurm is not installed here: no `sbatch` on PATH")
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
    proc = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(job_ids)],
        capture_output=True,
        text=True,
    )
    states: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        job, _, state = line.partition("|")
        if job:
            states[job] = state.split()[0] if state else "UNKNOWN"
    if not states:
        proc = subprocess.run(
            ["squeue", "-h", "-o", "%i|%T", "-j", ",".join(job_ids)], capture_output=True, text=True
        )
        for line in proc.stdout.splitlines():
            job, _, state = line.partition("|")
            states[job] = state
    return states
