"""Helper processes end with the process that started them (rlef_hpc.lifetime), whichever
thread started them, and so do their own forks, while the stop signals leave them alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.helpers import TESTS_DIR

pytestmark = pytest.mark.multiprocess

# A parent with two helpers that ignore SIGTERM: one started by its main thread (parent-death
# signal and watchdog), one by a thread that ends at once (watchdog only: the parent-death
# signal would have killed it with that thread); each forks a helper of its own. It prints the
# four pids, then waits to be killed.
PARENT = """
import multiprocessing, signal, threading, time
from rlef_hpc import lifetime

fork = multiprocessing.get_context("fork")
pids = fork.SimpleQueue()

def sleep():
    pids.put(multiprocessing.current_process().pid)
    time.sleep(600)

def helper(token):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    lifetime.die_with_parent(*token)
    fork.Process(target=sleep).start()
    sleep()

def start():
    fork.Process(target=helper, args=(lifetime.parent_token(),)).start()

start()
thread = threading.Thread(target=start)
thread.start()
thread.join()
print(*(pids.get() for _ in range(4)), flush=True)
time.sleep(600)
"""


def alive(pids: list[int]) -> list[int]:
    def running(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    return [pid for pid in pids if running(pid)]


def test_helpers_ignore_sigterm_and_die_with_their_parent_and_so_do_theirs():
    env = {**os.environ, "PYTHONPATH": str(TESTS_DIR.parent)}
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT], env=env, stdout=subprocess.PIPE, text=True
    )
    helpers: list[int] = []
    try:
        helpers += map(int, parent.stdout.readline().split())  # type: ignore[union-attr]
        assert len(helpers) == 4
        for pid in helpers:
            os.kill(pid, signal.SIGTERM)
        time.sleep(1.0)  # also: the thread that started the second one is long gone
        assert alive(helpers) == helpers
        parent.kill()
        parent.wait()
        start = time.monotonic()
        while alive(helpers) and time.monotonic() - start < 10:
            time.sleep(0.05)
        assert alive(helpers) == [], f"still running {time.monotonic() - start:.1f} s later"
    finally:
        parent.kill()
        for pid in alive(helpers):
            os.kill(pid, signal.SIGKILL)
