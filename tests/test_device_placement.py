"""Every tensor the trainer feeds a model or a collective is where that consumer lives (the
model's device; the host group's CPU), checked on CPU by tests/scripts/device_placement.py."""

from __future__ import annotations

import pytest

from tests.helpers import run_script, script

pytestmark = pytest.mark.multiprocess

WORKER = script("device_placement")


@pytest.mark.parametrize(
    "part",
    ["ppo_update", "warm_start", "refit_probe", "loop_reductions", "checkpoint", "value_head"],
)
def test_tensors_are_made_where_they_are_used(part):
    proc = run_script(WORKER, part, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert f"ok {part}" in proc.stdout
