"""Two policies (before and after RLEF) compared across feedback modes: rlef-eval on each, then
the comparison tables and the budget plot.

python tools/feedback_analysis.py BEFORE AFTER --out DIR [--feedback real,random,none]
    [--labels before,after] [any rlef-eval option: --problems, --rollouts, --temperature, ...]

BEFORE and AFTER are Hugging Face model directories (generated with vLLM) or JSON lines of
answers (replayed, as rlef-eval --answers). Each is evaluated by rlef-eval in a process of its
own (one vLLM engine per process), on the same problems with the same seed, into DIR/LABEL/;
then DIR/analysis.md (the tables), DIR/analysis.json (every report) and DIR/budgets.png.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from rlef_hpc import runtime
from rlef_hpc.eval.analysis import comparison_tables, parse_feedback_modes, plot_budgets


def main(argv: list[str] | None = None) -> int:
    runtime.setup()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("before", type=Path, help="model directory or answers file")
    p.add_argument("after", type=Path, help="model directory or answers file")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--feedback", default="real,random,none")
    p.add_argument("--labels", default="before,after", help="names of the two policies")
    args, passed_on = p.parse_known_args(argv)
    try:
        modes = parse_feedback_modes(args.feedback)
    except ValueError as e:
        p.exit(2, f"feedback_analysis: error: {e}\n")
    labels = [x.strip() for x in args.labels.split(",")]
    if len(labels) != 2 or len(set(labels)) != 2 or not all(labels):
        p.exit(2, "feedback_analysis: error: --labels needs two distinct names\n")
    reports = {}
    for label, source in zip(labels, (args.before, args.after), strict=True):
        kind = "--model" if source.is_dir() else "--answers"
        out = args.out / label
        command = [sys.executable, "-m", "rlef_hpc.eval.cli", kind, str(source)]
        command += ["--feedback", ",".join(modes), "--deterministic", "--out", str(out)]
        print(f"== {label}: {' '.join(command[1:])}", flush=True)
        if subprocess.run([*command, *passed_on]).returncode != 0:
            p.exit(1, f"feedback_analysis: error: rlef-eval failed on {label} ({source})\n")
        for mode in modes:
            where = out / mode if len(modes) > 1 else out
            reports[label, mode] = json.loads((where / "report.json").read_text())
    try:
        tables = comparison_tables(reports)
    except ValueError as e:
        p.exit(2, f"feedback_analysis: error: {e}\n")
    (args.out / "analysis.md").write_text(tables + "\n")
    (args.out / "analysis.json").write_text(
        json.dumps([{"policy": k[0], "feedback": k[1], **r} for k, r in reports.items()], indent=2)
    )
    plot_budgets(
        {f"{label} / {mode}": r for (label, mode), r in reports.items()},
        args.out / "budgets.png",
        title=f"{' vs '.join(labels)}, feedback: {', '.join(modes)}",
    )
    print(f"\n{tables}\n\nwrote {args.out}/analysis.md, analysis.json, budgets.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
