"""run_dir/best/: the checkpoint selected on valid (eval/best.json) as a Hugging Face model,
with selected.json naming it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from rlef_hpc import atomic
from rlef_hpc.eval.results import read_best


def export_best(
    run_dir: str | Path, exported: str | Path | None = None, move: bool = False
) -> Path | None:
    """run_dir/best/ from `exported` (the selected checkpoint already exported: moved there
    with `move`, a rename within the run directory, else copied), else run_dir/init
    (iteration 0) or the training checkpoint. A no-op when best/ already holds the selected
    checkpoint; None when nothing is selected yet."""
    run_dir = Path(run_dir)
    selection = read_best(run_dir)
    if selection is None:
        return None
    chosen = selection.result
    target = run_dir / "best"
    marker = {"iteration": chosen.iteration, "checkpoint": chosen.checkpoint}
    if (target / "selected.json").exists():
        if json.loads((target / "selected.json").read_text()) == marker:
            return target
    # A reader sees the old model or the new one, or (between two renames) none.
    with atomic.replacing(target, shared=True) as tmp:
        if exported is not None and move:
            os.replace(exported, tmp)
        elif exported is not None:
            shutil.copytree(exported, tmp)
        elif chosen.iteration == 0:
            shutil.copytree(run_dir / "init", tmp)
        else:
            from rlef_hpc.checkpoint.convert import export_hf

            export_hf(run_dir / chosen.checkpoint, tmp)
        (tmp / "selected.json").write_text(json.dumps(marker) + "\n")
    return target
