"""Fixtures only; what tests import (launchers, tiny configs, `require`) is in helpers.py. A
test that needs something this machine lacks fails under CI (CI=true) and is skipped, with
the reason printed, on a developer's machine."""

from __future__ import annotations

import os
from collections.abc import Iterator

import psutil
import pytest

from rlef_hpc import runtime
from tests.helpers import describe_processes, in_ci, live_processes, require

# The test session is an entry point like rlef-train: its process's runtime set-up, before a
# test imports torch. (Megatron models are built in the test scripts' processes, each with
# its own set-up.)
runtime.setup()

# Set before any executor starts: the hostile suite checks that no test can read it.
os.environ["RLEF_TEST_SECRET"] = "hunter2-do-not-leak"


# How long the suite's leftover processes get to end after the last test: helpers that watch
# their parent poll it a few times a second.
LEFTOVER_GRACE_S = 5.0
PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind() -> Iterator[None]:
    """At the end of the session, nothing the tests started may still run (a leak here is a
    process that outlives every run of the suite): fails under CI, warns elsewhere. Set up
    first, so torn down after every other session fixture (the shared executor's workers).
    This process becomes a child subreaper (Linux): the orphans of the tests' processes (a
    helper of a trainer that a test ran, and killed) come to it instead of to init, and so are
    among its descendants."""
    import sys

    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    yield
    import multiprocessing
    import time
    import warnings
    from multiprocessing import resource_tracker

    # This process's own multiprocessing children and resource tracker: multiprocessing ends
    # them when this process exits (the tracker at the end of its pipe).
    own = {p.pid for p in multiprocessing.active_children()}
    own.add(getattr(resource_tracker._resource_tracker, "_pid", None))
    deadline = time.monotonic() + LEFTOVER_GRACE_S
    while True:
        left = [p for p in live_processes(psutil.Process().children(True)) if p.pid not in own]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if left:
        message = (
            f"processes started by the tests still run {LEFTOVER_GRACE_S:.0f} s after the "
            f"last one:\n{describe_processes(left)}"
        )
        if in_ci():
            pytest.fail(message)
        warnings.warn(message, stacklevel=1)


@pytest.fixture(scope="session")
def executor() -> Iterator[object]:
    from rlef_hpc import sandbox

    caps = sandbox.capabilities()
    require(caps["seccomp"], "seccomp filters are unavailable on this kernel")
    with sandbox.Executor(workers=2) as ex:
        yield ex


def _queued_slurm_jobs() -> set[str] | None:
    """The ids of the jobs in the local cluster's queue; None without a cluster."""
    import subprocess

    try:
        proc = subprocess.run(
            ["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return set(proc.stdout.split()) if proc.returncode == 0 else None


@pytest.fixture(autouse=True)
def slurm_jobs_cancelled(request: pytest.FixtureRequest) -> Iterator[None]:
    """A Slurm test's jobs end with it: one that failed (or timed out) leaves nothing queued
    or running to hold the nodes from the next test (CI once lost three tests to the jobs of
    one that had hung)."""
    import subprocess
    import time

    before = _queued_slurm_jobs() if request.node.get_closest_marker("slurm") else None
    yield
    if before is None:
        return
    left = (_queued_slurm_jobs() or set()) - before
    if not left:
        return
    subprocess.run(["scancel", *sorted(left)], capture_output=True, timeout=30)
    deadline = time.monotonic() + 60  # KillWait (10 s) and the steps' ends
    while (_queued_slurm_jobs() or set()) & left and time.monotonic() < deadline:
        time.sleep(1)
