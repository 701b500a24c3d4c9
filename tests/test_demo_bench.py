"""benchmarks/demo_bench.py times each phase of the demo by wrapping the functions that own it:
a function renamed or moved would silently move its phase's time to "logging/other"."""

from __future__ import annotations

from tests.helpers import TESTS_DIR, run_script

BENCH = TESTS_DIR.parent / "benchmarks" / "demo_bench.py"


def test_every_phase_finds_its_functions():
    proc = run_script(BENCH, "--check-hooks", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert "hooks not found: none" in proc.stdout
