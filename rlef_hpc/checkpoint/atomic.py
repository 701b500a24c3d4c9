"""Directories that appear complete or not at all, with a `latest` pointer beside them."""

from __future__ import annotations

import os
import shutil
from collections.abc import Collection
from pathlib import Path

LATEST = "latest"


def commit(
    tmp: Path, final: Path, value: int, pattern: str, keep_last: int, keep: Collection[str] = ()
) -> None:
    """Renames the finished `tmp` to `final` (one atomic step), only then points
    `final.parent/latest` at `value` (atomically too), and prunes all but the newest
    `keep_last` directories matching `pattern` there, and those named in `keep` (checkpoints
    still to be evaluated, the best so far: the caller knows which)."""
    root = final.parent
    os.replace(tmp, final)
    pointer = root / f".{LATEST}.tmp"
    pointer.write_text(f"{value}\n")
    os.replace(pointer, root / LATEST)
    kept = sorted(p for p in root.glob(pattern) if p.is_dir())
    for old in kept[: max(0, len(kept) - keep_last)]:
        if old.name not in keep:
            shutil.rmtree(old, ignore_errors=True)
