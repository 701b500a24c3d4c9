"""Does RLEF learn, and does it learn *from the feedback*? The paper's key ablations at toy
scale, on the synthetic curriculum, each arm with the same budget and the same warm start:

  RLEF                 3 turns, the real execution feedback
  random feedback      3 turns, each feedback message taken from another problem's episode
  single turn          1 turn per episode (no feedback at all)

    python benchmarks/learning_bench.py [--iterations 30] [--valid-problems 40] [KEY=VALUE ...]
    python benchmarks/learning_bench.py data.curriculum=feedback warmstart.repairs=1

Held-out 1@3 (bootstrap 95% intervals) of the warm-started policy and of each arm after
training, and the share of rollouts solved by the first and by the last turn; every arm runs
`rlef-train` on configs/demo_cpu.yaml in a process of its own. The second command uses the
curriculum where close to half of the problems can only be solved from the feedback, with a
warm start that has seen feedback used (see docs/training.md).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from rlef_hpc.eval.results import CheckpointResult, read_results

ROOT = Path(__file__).resolve().parents[1]
ARMS = {
    "RLEF (real feedback, 3 turns)": [],
    "random feedback (3 turns)": ["episodes.feedback=random"],
    "single turn": ["episodes.max_turns=1"],
}


def run_arm(run_dir: Path, overrides: list[str]) -> dict[str, dict]:
    cmd = [sys.executable, "-m", "rlef_hpc.train.cli", str(ROOT / "configs" / "demo_cpu.yaml")]
    proc = subprocess.run([*cmd, f"run.dir={run_dir}", *overrides], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{run_dir.name} failed:\n{proc.stderr[-4000:]}")
    records = read_results(run_dir)  # the initial policy first, the last last
    return {tag: valid_1at3(r) for tag, r in (("before", records[0]), ("after", records[-1]))}


def valid_1at3(record: CheckpointResult) -> dict:
    """The record's valid 1@3, and the solve rate by turn of the rollouts it came from."""
    valid = record.sets["valid"]
    sampling = next(s for s in valid.samplings if "1@3" in s.metrics)
    return {**asdict(valid.metrics["1@3"]), "by_turn": sampling.solved_by_turn}


def cell(row: dict) -> str:
    return f"{100 * row['mean']:.1f}% [{100 * row['low']:.1f}, {100 * row['high']:.1f}]"


def turns(row: dict) -> str:
    return f"{100 * row['by_turn'][0]:.1f}% / {100 * row['by_turn'][-1]:.1f}%"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=30)
    # held-out problems: 41 in the basic curriculum, 113 in the feedback one
    p.add_argument("--valid-problems", type=int, default=40)
    p.add_argument("overrides", nargs="*", help="extra config overrides for every arm")
    args = p.parse_args()
    common = [
        f"run.iterations={args.iterations}",
        f"data.valid_problems={args.valid_problems}",
        f"run.checkpoint_every={args.iterations}",
        "eval.rollouts_per_problem=8",
        # held-out (valid) 1@3 only, as this bench has always measured
        "eval.metrics=[{name: 1@3}]",
        "data.test_problems=0",
        *args.overrides,
    ]
    tmp = Path(tempfile.mkdtemp(prefix="learning-bench-"))
    results = {}
    try:
        first = None
        for i, (arm, overrides) in enumerate(ARMS.items()):
            run_dir = tmp / f"arm{i}"
            if first is not None:  # the same warm-started policy for every arm
                shutil.copytree(first / "init", run_dir / "init")
            results[arm] = run_arm(run_dir, [*common, *overrides])
            first = first or run_dir
            print(f"{arm}: {cell(results[arm]['after'])}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    before = next(iter(results.values()))["before"]
    print(
        f"held-out synthetic problems: {args.valid_problems}, 1@3 at temperature 0.2, "
        f"{args.iterations} iterations per arm, this machine, one run"
        + (f", with {' '.join(args.overrides)}" if args.overrides else "")
    )
    print()
    print("| policy | held-out 1@3 [95% CI] | gain over warm start | solved by turn 1 / last |")
    print("|---|---|---|---|")
    print(f"| warm start (before RL) | {cell(before)} | - | {turns(before)} |")
    for arm, r in results.items():
        gain = 100 * (r["after"]["mean"] - before["mean"])
        separate = r["after"]["low"] > before["high"]
        note = " (CIs do not overlap)" if separate else ""
        print(f"| {arm} | {cell(r['after'])} | {gain:+.1f} points{note} | {turns(r['after'])} |")


if __name__ == "__main__":
    from rlef_hpc import runtime

    runtime.setup()
    main()
