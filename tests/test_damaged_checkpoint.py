"""rlef-train on a run directory whose newest checkpoint was damaged after its commit (a policy
shard cut short): one line on the terminal, the checkpoint set aside in damaged/ with the
details in the log, the run resumed from the newest intact checkpoint, `tools/submit.py status`
showing it; and with no intact checkpoint left, one line and exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import TINY_TRAIN, require, run_tool

pytestmark = pytest.mark.multiprocess  # rlef-train (and its engine) in processes of their own


def rlef_train(*overrides: str) -> subprocess.CompletedProcess:
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        require(False, f"vLLM not installed ({e}): pip install -e '.[cpu]'")
    cmd = [sys.executable, "-m", "rlef_hpc.train.cli", *TINY_TRAIN, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)


def truncate(path: Path) -> str:
    """Cuts `path` to half its size; returns what the resume is expected to say of it."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    return f"{size // 2} bytes, {size} when saved"


def test_a_damaged_newest_checkpoint_is_set_aside_and_the_run_resumes(tmp_path):
    run = tmp_path / "run"
    proc = rlef_train(f"run.dir={run}", "run.iterations=2", "run.checkpoint_every=1")
    assert proc.returncode == 0, proc.stderr[-4000:]
    shard = sorted((run / "iter_0000002" / "policy").glob("*.distcp"))[0]
    sizes = truncate(shard)
    (run / ".tmp-iter_0000003").mkdir()  # and a save that was killed holds space
    (run / ".tmp-iter_0000003" / "part").write_bytes(bytes(100_000))

    proc = rlef_train(f"run.dir={run}", "run.iterations=3")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    said = [line for line in proc.stdout.splitlines() if line.startswith("checkpoint ")]
    assert said == [
        f"checkpoint iter_0000002 damaged (policy/{shard.name}: {sizes}): set aside in "
        f"{run / 'damaged'}/; resuming from iter_0000001"
    ]
    assert f"resumed from {run / 'iter_0000001'} (iteration 1)" in proc.stdout
    assert (run / "damaged" / "iter_0000002" / "policy" / shard.name).exists()
    assert not (run / ".tmp-iter_0000003").exists()
    assert (run / "latest").read_text().strip() == "3"
    log = (run / "logs" / "train.log").read_text()
    assert f"iter_0000002 is damaged, set aside as {run / 'damaged' / 'iter_0000002'}" in log

    (run / "slurm").mkdir()
    (run / "slurm" / "jobs.json").write_text(json.dumps([{"train": "12"}]))
    no_slurm = tmp_path / "bin-without-slurm"
    no_slurm.mkdir()
    status = run_tool("submit.py", "status", run, env={"PATH": str(no_slurm)})
    assert status.returncode == 0, status.stderr
    assert (
        f"set aside as damaged: iter_0000002 (policy/{shard.name}: {sizes}), in "
        f"{run / 'damaged' / 'iter_0000002'}" in status.stdout
    )

    for state in run.glob("iter_*/trainer_state.pt"):
        truncate(state)
    proc = rlef_train(f"run.dir={run}", "run.iterations=4")
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"rlef-train: error: {run}: no intact checkpoint (all set aside in {run / 'damaged'}/); "
        "move one back to resume from it, or start in another run.dir"
    )
