"""Files and directories that appear complete or not at all: each is written under a temporary
name beside its final one (the same filesystem, so that the rename is one atomic step), then
renamed into place. The one temporary-name scheme of the package, `.tmp-NAME` (a writer that
shares its temporary with other processes: a checkpoint's ranks) or `.tmp-NAME.PID` (one
process's own), so that leftovers of a killed writer are recognised (`sweep`) and never
mistaken for the real thing by a glob of final names.

The base layer (beside jsonl and logs): the sandbox's compile cache, rollout shards, the bus's
address files, the problems and evaluation files and the checkpoints all write through it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

PREFIX = ".tmp-"
LATEST = "latest"


def temporary(path: str | Path, shared: bool = False) -> Path:
    """Where `path` is written before it is renamed into place: `.tmp-NAME` beside it when
    `shared` (every process writing it must agree on the name), else `.tmp-NAME.PID` (several
    processes may write the same file at once: each its own, the last rename wins)."""
    path = Path(path)
    suffix = "" if shared else f".{os.getpid()}"
    return path.with_name(f"{PREFIX}{path.name}{suffix}")


def remove(path: Path) -> None:
    """Removes a file or a directory tree, whichever `path` is, if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def replacing(path: str | Path, shared: bool = False) -> Iterator[Path]:
    """Yields the temporary path for `path` (nothing there: the caller creates a file or a
    directory at it); when the block ends without an exception it is renamed onto `path`,
    else removed. A directory replaces an existing directory in two renames (the old one goes
    to a temporary name first, and is removed after): a reader may find nothing at `path`
    between them, never a mixture."""
    path = Path(path)
    tmp = temporary(path, shared)
    remove(tmp)  # a killed writer's, of the same name
    try:
        yield tmp
    except BaseException:
        remove(tmp)
        raise
    if tmp.is_dir() and path.is_dir():
        old = temporary(path.with_name(f"{path.name}.old"))
        os.replace(path, old)
        os.replace(tmp, path)
        remove(old)
    else:
        os.replace(tmp, path)


def write_text(path: str | Path, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text)


def write_bytes(path: str | Path, data: bytes) -> None:
    with replacing(path) as tmp:
        tmp.write_bytes(data)


def sweep(root: str | Path, pattern: str = "*") -> list[Path]:
    """Removes the temporaries `.tmp-PATTERN` in `root` (of writers that were killed); returns
    what it removed. Only for temporaries nobody is writing any more: the caller knows."""
    removed = sorted(Path(root).glob(f"{PREFIX}{pattern}"))
    for path in removed:
        remove(path)
    return removed


def point(root: Path, value: int) -> None:
    """`root/latest` holds `value`, replaced atomically."""
    write_text(root / LATEST, f"{value}\n")


def commit(
    tmp: Path, final: Path, value: int, pattern: str, keep_last: int, keep: Collection[str] = ()
) -> None:
    """Renames the finished `tmp` to `final` (one atomic step), only then points
    `final.parent/latest` at `value` (atomically too), and prunes all but the newest
    `keep_last` directories matching `pattern` there, and those named in `keep` (checkpoints
    still to be evaluated, the best so far: the caller knows which)."""
    root = final.parent
    os.replace(tmp, final)
    point(root, value)
    kept = sorted(p for p in root.glob(pattern) if p.is_dir())
    for old in kept[: max(0, len(kept) - keep_last)]:
        if old.name not in keep:
            shutil.rmtree(old, ignore_errors=True)
