"""The verdict on one test from what the supervisor observed (before the executor compares
the output: OK here means the program exited cleanly within its limits)."""

from __future__ import annotations

import signal
from collections.abc import Mapping
from typing import Any

from rlef_hpc.sandbox.types import Limits, Verdict

# Why supervise() ended a test early (csrc/executor.cc: Reason); 0: it exited by itself.
REASON_WALL, REASON_OUTPUT = 1, 2


def verdict_of(obs: Mapping[str, Any], limits: Limits, memory_kb: int) -> Verdict:
    """`obs` is supervise()'s observation; `memory_kb` the solution's own peak memory. The order
    matters: a killed test's exit code says only how it ended, the cause comes first."""
    code, stderr = obs["code"], obs["stderr"]
    if obs["reason"] == REASON_OUTPUT:
        return Verdict.OUTPUT_LIMIT
    if code == -signal.SIGSYS:  # seccomp killed it
        return Verdict.SANDBOX_VIOLATION
    # Out of address space shows as an allocation failure, or (for a solution that handles it)
    # as a crash or a stall with its peak at the limit. Memory comes before the clock: a test
    # that reached its memory limit and then ran out of time ran out of memory first, and
    # "too long" would send the model after the wrong fault.
    at_limit = memory_kb >= 0.98 * (limits.memory_mb << 10)
    if code != 0 and at_limit:
        return Verdict.MEMORY_LIMIT
    if obs["reason"] == REASON_WALL or obs["cpu_s"] > limits.time_s or code == -signal.SIGXCPU:
        return Verdict.TIME_LIMIT
    if code != 0:
        out_of_memory = b"MemoryError" in stderr[-512:] or b"std::bad_alloc" in stderr[-512:]
        return Verdict.MEMORY_LIMIT if out_of_memory else Verdict.RUNTIME_ERROR
    return Verdict.OK
