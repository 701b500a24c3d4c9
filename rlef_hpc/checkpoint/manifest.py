"""What a checkpoint's files were when it was saved, and whether they still are: the size and
SHA-256 of every file, in `manifest.json` at the checkpoint's root (`sha256sum` checks a file
by hand).

The digests are computed where they cost least: each rank hashes the files it has just written
(torch_dist names them `__RANK_N.distcp`), in the background writer of an asynchronous save,
while they are in its page cache; rank 0 hashes the rest (metadata, the trainer state, the
tokenizer: small) and writes the manifest before the checkpoint is committed. A resume checks
the sizes and digests of the newest checkpoint, every rank a share of its bytes. Measured costs
and the reasons for this choice: docs/checkpoints.md (benchmarks/checkpoint_digest_bench.py).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

MANIFEST = "manifest.json"
_OWN = ".digests"  # per rank, merged into the manifest at commit
_CHUNK = 8 << 20


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def files(root: Path) -> list[str]:
    """Every file under `root`, relative, sorted; the manifest itself aside."""
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and p.name != MANIFEST and _OWN not in p.parts
    )


def record_own(root: Path, models: Sequence[str], rank: int) -> None:
    """Right after this rank's writes into `root/MODEL/`: the size and digest of each file
    it wrote there, kept under root/.digests/ for the manifest."""
    own = {}
    for name in models:
        for path in sorted((root / name).glob(f"__{rank}_*.distcp")):
            own[str(path.relative_to(root))] = {"size": path.stat().st_size, "sha256": digest(path)}
    (root / _OWN).mkdir(exist_ok=True)
    (root / _OWN / f"{rank}.json").write_text(json.dumps(own))


def write(root: Path) -> None:
    """Rank 0, before the commit: the manifest of every file under `root`, from the ranks'
    records where they match the file as it is, hashing the rest."""
    known: dict[str, dict[str, object]] = {}
    for record in sorted((root / _OWN).glob("*.json")):
        known.update(json.loads(record.read_text()))
    entries = {}
    for name in files(root):
        size = (root / name).stat().st_size
        entry = known.get(name)
        if entry is None or entry["size"] != size:
            entry = {"size": size, "sha256": digest(root / name)}
        entries[name] = entry
    (root / MANIFEST).write_text(json.dumps({"files": entries}, indent=0))
    shutil.rmtree(root / _OWN, ignore_errors=True)


def share(sizes: dict[str, int], rank: int, world: int) -> set[str]:
    """The files `rank` checks: the largest first, each to the rank with the fewest bytes so
    far (every rank computes the same split)."""
    load = [0] * world
    mine = set()
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        r = min(range(world), key=lambda i: (load[i], i))
        load[r] += sizes[name]
        if r == rank:
            mine.add(name)
    return mine


def check(root: Path, rank: int = 0, world: int = 1) -> list[str]:
    """What is wrong with checkpoint `root`, one line each: no manifest, a file missing or of
    another size (every rank checks every size: a stat each), or (for this rank's share of the
    bytes) another digest. Empty: intact."""
    try:
        entries = json.loads((root / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError) as e:
        return [f"{MANIFEST}: unreadable ({type(e).__name__})"]
    problems = []
    for name, entry in entries.items():
        path = root / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif path.stat().st_size != entry["size"]:
            problems.append(f"{name}: {path.stat().st_size} bytes, {entry['size']} when saved")
    if problems:
        return problems
    mine = share({n: e["size"] for n, e in entries.items()}, rank, world)
    return [
        f"{name}: SHA-256 differs from when it was saved"
        for name in sorted(mine)
        if digest(root / name) != entries[name]["sha256"]
    ]


def merge(found: Iterable[Iterable[str]]) -> list[str]:
    """The problems every rank found, once each, in order."""
    return sorted({p for part in found for p in part})
