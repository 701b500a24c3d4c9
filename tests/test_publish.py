"""Publishing the policy for standalone rollout workers streams: one replica gathers, one rank
per stage holds a shard and the tensor in hand, never the stage's whole weights."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.helpers import script, torchrun_command

pytestmark = pytest.mark.multiprocess

WORKER = script("publish_memory")


def test_publish_holds_a_shard_and_a_tensor_not_the_model(tmp_path):
    out = tmp_path / "out.json"
    cmd, env = torchrun_command(WORKER, 4, tmp_path / "run", out)
    # glibc serves blocks below its dynamic mmap threshold (up to 32 MB) from heaps it rarely
    # trims, so RSS would count what fragmentation keeps; a 70B model's big tensors (hundreds
    # of MB) are mapped and unmapped: pin the threshold so the test's small ones are too.
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    m = json.loads(out.read_text())
    largest, shard = m["largest_tensor_bytes"], m["shard_bytes"]
    assert m["model_bytes"] > 40 * largest and m["files"] > 1  # shards written as they fill
    peak = {(r["dp"], r["tp"]): r["peak_bytes"] for r in m["ranks"]}
    # Measured: 25 MB, 14 MB, 2 MB, 2 MB (a whole model of 200 MB each before: ~210 MB each).
    # The writer: a shard being filled (and its serialisation), the gathered tensor in hand.
    assert peak[0, 0] < 2 * shard + 6 * largest
    assert peak[0, 1] < 6 * largest  # takes part in the gathers, keeps nothing
    assert peak[1, 0] < largest and peak[1, 1] < largest  # the other replica: no gathers
