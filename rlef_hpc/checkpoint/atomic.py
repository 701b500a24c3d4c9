"""Directories that appear complete or not at all, with a `latest` pointer beside them."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

LATEST = "latest"


def commit(tmp: Path, final: Path, value: int, pattern: str, keep_last: int) -> None:
    """Renames the finished `tmp` to `final` (one atomic step), only then points
    `final.parent/latest` at `value` (atomically too), and prunes all but the newest
    `keep_last` directories matching `pattern` there."""
    root = final.parent
    os.replace(tmp, final)
    pointer = root / f".{LATEST}.tmp"
    pointer.write_text(f"{value}\n")
    os.replace(pointer, root / LATEST)
    kept = sorted(p for p in root.glob(pattern) if p.is_dir())
    for old in kept[: max(0, len(kept) - keep_last)]:
        shutil.rmtree(old, ignore_errors=True)
