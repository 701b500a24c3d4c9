"""A checkpoint's manifest (sizes and SHA-256 of every file, the digests computed by the rank
that wrote each file), a resume that checks the newest checkpoint (every rank a share of the
bytes) and sets damaged ones aside, and a full disk recognised however deep a writer wrapped it."""

from __future__ import annotations

import errno
import hashlib
import json
import pickle
import subprocess
from pathlib import Path

import pytest

from rlef_hpc.checkpoint import manifest, space, training
from tests.helpers import script, torchrun_command


def fake_checkpoint(root: Path, seed: int = 0) -> Path:
    """A checkpoint's files as two ranks' save leaves them, before the commit."""
    files = {
        "policy/__0_0.distcp": 3000,
        "policy/__1_0.distcp": 2000,
        "policy/.metadata": 50,
        "value/__0_0.distcp": 1000,
        "value/__1_0.distcp": 1500,
        training.STATE: 70,
    }
    for name, size in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(bytes((seed + i) % 251 for i in range(size)))
    return root


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_manifest_holds_every_file_with_the_writers_digests(tmp_path):
    root = fake_checkpoint(tmp_path / ".tmp-iter_0000001")
    for rank in (0, 1):
        manifest.record_own(root, ["policy", "value"], rank)
    recorded = json.loads((root / ".digests" / "1.json").read_text())
    assert sorted(recorded) == ["policy/__1_0.distcp", "value/__1_0.distcp"]
    # What a rank recorded is taken as it is (rank 0 does not hash those files again).
    recorded["policy/__1_0.distcp"]["sha256"] = "recorded by rank 1"
    (root / ".digests" / "1.json").write_text(json.dumps(recorded))
    manifest.write(root)
    entries = json.loads((root / manifest.MANIFEST).read_text())["files"]
    assert sorted(entries) == manifest.files(root) and len(entries) == 6
    assert not (root / ".digests").exists()
    assert entries["policy/__1_0.distcp"]["sha256"] == "recorded by rank 1"
    for name in ("policy/__0_0.distcp", "policy/.metadata", training.STATE):
        assert entries[name] == {
            "size": (root / name).stat().st_size,
            "sha256": sha256(root / name),
        }


def committed(root: Path) -> Path:
    fake_checkpoint(root)
    manifest.write(root)
    return root


def test_check_names_each_damaged_file(tmp_path):
    root = committed(tmp_path / "iter_0000001")
    assert manifest.check(root) == []
    with open(root / "policy/__0_0.distcp", "r+b") as f:
        f.truncate(100)
    (root / "value/__1_0.distcp").unlink()
    assert manifest.check(root) == [
        "policy/__0_0.distcp: 100 bytes, 3000 when saved",
        "value/__1_0.distcp: missing",
    ]
    root = committed(tmp_path / "iter_0000002")
    data = bytearray((root / "value/__0_0.distcp").read_bytes())
    data[10] ^= 1  # same size, one bit flipped
    (root / "value/__0_0.distcp").write_bytes(bytes(data))
    found = [manifest.check(root, rank, 2) for rank in (0, 1)]
    assert manifest.merge(found) == ["value/__0_0.distcp: SHA-256 differs from when it was saved"]
    assert [] in found  # one rank checked that file, the other did not
    (root / manifest.MANIFEST).unlink()
    assert manifest.check(root) == ["manifest.json: unreadable (FileNotFoundError)"]


def test_the_ranks_share_the_bytes_to_check():
    sizes = {f"f{i}": s for i, s in enumerate([900, 500, 400, 300, 300, 200, 100, 50])}
    shares = [manifest.share(sizes, rank, 3) for rank in range(3)]
    assert set().union(*shares) == set(sizes) and sum(map(len, shares)) == len(sizes)
    loads = [sum(sizes[n] for n in share) for share in shares]
    assert max(loads) - min(loads) <= max(sizes.values())


class CheckpointException(Exception):
    """torch.distributed.checkpoint's: each rank's failure in `failures`."""

    def __init__(self, failures):
        super().__init__("write")
        self.failures = failures


def test_a_full_disk_is_recognised_however_it_was_wrapped():
    full = OSError(errno.ENOSPC, "No space left on device")
    try:
        raise RuntimeError("Worker failure") from full
    except RuntimeError as e:
        wrapped = e
    assert space.no_space(full) and space.no_space(wrapped)
    assert space.no_space(CheckpointException({1: (wrapped, "traceback")}))
    assert space.no_space(OSError(errno.EDQUOT, "Disk quota exceeded"))
    # Pickled across the writer's process boundary as a message only.
    assert space.no_space(pickle.loads(pickle.dumps(RuntimeError(str(full)))))
    assert not space.no_space(CheckpointException({0: (ValueError("bad"), "traceback")}))
    assert not space.no_space(None)


def test_what_keep_last_needs():
    assert space.needed(10, keep_last=3, existing=0) == 40  # 3 kept, one being written
    assert space.needed(10, keep_last=3, existing=2) == 20
    assert space.needed(10, keep_last=3, existing=5) == 10
    assert space.human(4_200_000) == "4.2 MB" and space.human(512) == "512 B"


@pytest.mark.multiprocess
def test_a_resume_sets_damaged_checkpoints_aside_and_takes_the_newest_intact(tmp_path):
    run = tmp_path / "run"
    for i in (1, 2, 3):
        committed(run / f"iter_{i:07d}")
    (run / "latest").write_text("3\n")
    (run / ".tmp-iter_0000004").mkdir()  # a save that was killed
    with open(run / "iter_0000003" / "policy/__1_0.distcp", "r+b") as f:
        f.truncate(10)
    data = bytearray((run / "iter_0000002" / "policy/__0_0.distcp").read_bytes())
    data[-1] ^= 0xFF  # only a digest notices: checked by one of the two ranks
    (run / "iter_0000002" / "policy/__0_0.distcp").write_bytes(bytes(data))
    cmd, env = torchrun_command(script("resume_point"), 2, run, tmp_path / "out")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"out.{r}").read_text()) for r in (0, 1)]
    assert [r["chosen"] for r in ranks] == ["iter_0000001", "iter_0000001"]
    assert ranks[1]["said"] == []
    (line,) = ranks[0]["said"]
    assert line == (
        "checkpoint iter_0000003, iter_0000002 damaged (policy/__1_0.distcp: 10 bytes, "
        f"2000 when saved): set aside in {run / 'damaged'}/; resuming from iter_0000001"
    )
    assert sorted(p.name for p in run.iterdir()) == ["damaged", "iter_0000001", "latest"]
    assert (run / "latest").read_text().strip() == "1"
    assert training.status_lines(run) == [
        "checkpoint: iter_0000001",
        "set aside as damaged: iter_0000003 (policy/__1_0.distcp: 10 bytes, 2000 when saved), "
        f"in {run / 'damaged' / 'iter_0000003'}",
        "set aside as damaged: iter_0000002 (policy/__0_0.distcp: SHA-256 differs from when "
        f"it was saved), in {run / 'damaged' / 'iter_0000002'}",
    ]


def test_a_checkpoint_set_aside_again_keeps_the_first(tmp_path):
    for n in (1, 2, 3):
        (tmp_path / "iter_0000002").mkdir()
        (tmp_path / "iter_0000002" / "n").write_text(str(n))
        training._set_aside(tmp_path, tmp_path / "iter_0000002", [f"problem {n}"])
    damaged = tmp_path / training.DAMAGED
    assert sorted(p.name for p in damaged.iterdir()) == [
        "iter_0000002", "iter_0000002-2", "iter_0000002-2.json", "iter_0000002-3",
        "iter_0000002-3.json", "iter_0000002.json",
    ]  # fmt: skip
    assert (damaged / "iter_0000002-3" / "n").read_text() == "3"
    assert training.status_lines(tmp_path)[1:] == [
        f"set aside as damaged: iter_0000002 (problem {n}), in {damaged / name}"
        for n, name in ((1, "iter_0000002"), (2, "iter_0000002-2"), (3, "iter_0000002-3"))
    ]
