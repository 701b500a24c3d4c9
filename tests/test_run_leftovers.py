"""No process of a training run outlives it: after a normal exit, SIGTERM (exit 75) and
SIGKILL of the trainer, within a few seconds nothing it started (sandbox servers, the
checkpoint writers and their Manager, multiprocessing's resource tracker) still runs."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import TINY_TRAIN, describe_processes, live_processes, require

pytestmark = pytest.mark.multiprocess

# "A few seconds": helpers that missed the parent-death signal poll their parent 5 times a
# second; the rest is slack for a loaded machine.
GONE_WITHIN_S = 10.0


def in_session(sid: int) -> list[psutil.Process]:
    """The processes of session `sid` (the trainer's: it starts one), wherever re-parented."""
    found = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                found.append(p)
        except OSError:
            continue  # gone meanwhile
    return found


def trained(run: Path) -> bool:
    metrics = run / "metrics.jsonl"
    return metrics.exists() and any(
        json.loads(line)["kind"] == "train" for line in metrics.read_text().splitlines()
    )


@pytest.mark.parametrize("ending", ["exit", "sigterm", "sigkill"])
def test_nothing_of_a_run_outlives_its_trainer(tmp_path, ending):
    require(importlib.util.find_spec("vllm") is not None, "vLLM not installed")
    run = tmp_path / "run"
    iterations = 1 if ending == "exit" else 50
    # Saved every iteration in the background: a forked writer may be running at the end.
    cmd = [sys.executable, "-m", "rlef_hpc.train.cli", *TINY_TRAIN, f"run.dir={run}",
           f"run.iterations={iterations}", "run.checkpoint_every=1", "run.async_save=true",
           "data.valid_problems=0"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = (tmp_path / "trainer.log").open("w")
    trainer = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, start_new_session=True)
    # Whatever the trainer starts, as it starts it: found again even if it left the session.
    seen: dict[int, psutil.Process] = {}
    try:
        while trainer.poll() is None and not (ending != "exit" and trained(run)):
            for p in psutil.Process(trainer.pid).children(recursive=True):
                seen.setdefault(p.pid, p)
            time.sleep(0.2)
        if ending == "sigterm":
            trainer.send_signal(signal.SIGTERM)  # during iteration 2
        elif ending == "sigkill":
            trainer.kill()  # mid-iteration 2, iteration 1's save maybe in flight
        status = trainer.wait(timeout=600)
        ended = time.monotonic()
        expected = {"exit": 0, "sigterm": 75, "sigkill": -signal.SIGKILL}[ending]
        assert status == expected, (tmp_path / "trainer.log").read_text()[-3000:]
        while True:
            left = live_processes([*seen.values(), *in_session(trainer.pid)])
            waited = time.monotonic() - ended
            if not left or waited > GONE_WITHIN_S:
                break
            time.sleep(0.05)
        print(f"{ending}: {len(seen)} processes of the run, all gone {waited:.2f} s after it")
        assert not left, f"still running {waited:.1f} s after the trainer:\n" + (
            describe_processes(left)
        )
        assert seen  # the run had helpers (sandbox servers, Manager): the check saw something
    finally:
        trainer.kill()
        for p in live_processes([*seen.values(), *in_session(trainer.pid)]):
            p.kill()
