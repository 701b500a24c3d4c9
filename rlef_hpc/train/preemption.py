"""Stopping a training job cleanly: Slurm's signals become a flag that the trainer checks at
the end of each iteration (all ranks agree), then a checkpoint and exit status 75. An
evaluation (the trainer's, or the evaluation job's) asks the flag before each generation batch
and is abandoned at once: it is redone when the job resumes."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from rlef_hpc.dist_env import host_group

# Exit status of a run stopped by SIGTERM/SIGUSR1/SIGUSR2 once its checkpoint is saved
# (EX_TEMPFAIL): run the same command again (or let Slurm requeue the job) to continue.
EXIT_PREEMPTED = 75
# SIGTERM: Slurm's preemption, scancel and `scontrol requeue`; SIGUSR1: the sbatch scripts'
# --signal before the time limit; SIGUSR2: submitit's.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class Preempted(SystemExit):
    def __init__(self, signum: int | None = None) -> None:
        super().__init__(EXIT_PREEMPTED)
        self.signum = signum


class StopFlag:
    """Set by any of STOP_SIGNALS while installed (a context manager); `everywhere()` asks
    every rank whether one of them was signalled (collective). `announce`: say on the terminal
    what the signal does, as `during()` names it for the work in progress."""

    def __init__(
        self, announce: bool, response: str = "checkpointing after this iteration"
    ) -> None:
        self.signum: int | None = None
        self.announce = announce
        self.response = response
        self._previous: dict[int, Any] = {}

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signum = signum
        if self.announce:
            name = signal.Signals(signum).name
            print(f"signal {name}: {self.response}", flush=True)

    def is_set(self) -> bool:
        """Whether a stop signal reached this process (a rank's own view)."""
        return self.signum is not None

    @contextlib.contextmanager
    def during(self, response: str) -> Iterator[StopFlag]:
        """What a signal is announced to do while the block runs."""
        previous, self.response = self.response, response
        try:
            yield self
        finally:
            self.response = previous

    def __enter__(self) -> StopFlag:
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)

    def everywhere(self) -> bool:
        flag = torch.tensor([float(self.signum is not None)], device="cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=host_group())  # gloo: a CPU flag
        return bool(flag.item())
