"""Disk space for checkpoints: what a filesystem has free, what a run's checkpoints take, and a
full disk said in words (which filesystem, what the save needed, what was free) rather than as
the writer's traceback."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

from rlef_hpc.checkpoint.manifest import MANIFEST

# Less free than this after a failed write: the filesystem is full, whatever the error said.
FULL = 1 << 20


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def mount_point(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists():
        path = path.parent
    while not os.path.ismount(path):
        path = path.parent
    return path


def filesystem(path: Path) -> str:
    """The filesystem holding `path`, for people: "/scratch (lustre)"."""
    mount = mount_point(path)
    kind = "?"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) > 2 and fields[1] == str(mount):
                kind = fields[2]  # the last mount on a point is the one in effect
    except OSError:
        pass
    return f"{mount} ({kind})"


def free(path: Path) -> int:
    """Bytes an unprivileged writer may still use on `path`'s filesystem."""
    return shutil.disk_usage(mount_point(path)).free


def size(checkpoint: Path) -> int:
    """Bytes a checkpoint's files take: as its manifest says (one read, where a 70B
    checkpoint's thousands of files would be as many stats of a parallel filesystem), else
    counted."""
    try:
        entries = json.loads((checkpoint / MANIFEST).read_text())["files"].values()
        return sum(e["size"] for e in entries)
    except (OSError, ValueError, KeyError):
        return sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())


def no_space(error: BaseException) -> bool:
    """Whether `error` is, or was caused by, a full disk (ENOSPC, or a quota: EDQUOT), however
    deep a writer wrapped it: torch's CheckpointException keeps each rank's failure in
    `failures` (rank: (exception, traceback)); megatron's writer raises RuntimeError from it."""
    seen = set()
    todo = [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e):  # pickled across a process boundary as text
            return True
        todo += [e.__cause__, e.__context__]
        for failure in getattr(e, "failures", {}).values():
            todo.append(failure[0] if isinstance(failure, tuple) else failure)
    return False


def needed(checkpoint_bytes: int, keep_last: int, existing: int) -> int:
    """Free bytes a run still needs: `keep_last` checkpoints kept and one more being written
    before retention removes the oldest, less the `existing` ones already on the disk."""
    return checkpoint_bytes * max(0, keep_last + 1 - min(existing, keep_last))
