"""Trajectory shards: how rollout workers hand episodes to the trainer through the run
directory on the shared filesystem (the disaggregated layout).

    run_dir/trajectories/
      pending/w003-s000012-v00000007.pt   written complete (a hidden temp file, then renamed):
                                          worker 3's 12th shard, sampled by policy version 7
      claimed/iter_0000008/...            taken by the trainer for iteration 8 (a rename)
      stale/...                           older than the trainer accepts: set aside, kept
      DONE                                the trainer has finished: workers exit

Every shard is in exactly one place at any time, and a move is one atomic rename, so a shard is
never trained on twice nor lost: a trainer that restarts from its checkpoint of iteration N
first takes back what iteration N+1 had already claimed. A worker that restarts discards its
half-written temp file and continues from its next sequence number (the shard it was writing
is regenerated under the same number and seed).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlef_hpc import atomic
from rlef_hpc.data.trajectory import Trajectory

ROOT = "trajectories"
_NAME = re.compile(r"w(\d+)-s(\d+)-v(\d+)\.pt$")


@dataclass(frozen=True, order=True)
class Shard:
    version: int
    seq: int
    worker: int
    path: Path

    @classmethod
    def parse(cls, path: Path) -> Shard | None:
        m = _NAME.match(path.name)
        if not m:
            return None
        return cls(int(m[3]), int(m[2]), int(m[1]), path)


def shard_name(worker: int, seq: int, version: int) -> str:
    return f"w{worker:03d}-s{seq:06d}-v{version:08d}.pt"


class ShardStore:
    def __init__(self, run_dir: str | Path) -> None:
        self.root = Path(run_dir) / ROOT
        self.pending, self.stale = self.root / "pending", self.root / "stale"
        self.claimed = self.root / "claimed"

    def _mkdirs(self) -> None:
        for d in (self.pending, self.stale, self.claimed):
            d.mkdir(parents=True, exist_ok=True)

    def _shards(self, folder: Path) -> list[Shard]:
        found = (Shard.parse(p) for p in folder.glob("*.pt")) if folder.exists() else ()
        return sorted(s for s in found if s is not None)

    def iteration_dir(self, iteration: int) -> Path:
        return self.claimed / f"iter_{iteration:07d}"

    # --- the worker's side -------------------------------------------------------------------

    def next_seq(self, worker: int) -> int:
        """One past the worker's newest shard wherever it is now (pending, claimed or stale);
        removes the worker's half-written temp files."""
        self._mkdirs()
        atomic.sweep(self.pending, f"w{worker:03d}-*")
        seqs = [
            s.seq
            for folder in (self.pending, self.stale, *self.claimed.glob("iter_*"))
            for s in self._shards(folder)
            if s.worker == worker
        ]
        return max(seqs, default=-1) + 1

    def pending_of(self, worker: int) -> int:
        return sum(s.worker == worker for s in self._shards(self.pending))

    def write(self, worker: int, seq: int, version: int, trajectories: list[Trajectory]) -> Path:
        self._mkdirs()
        final = self.pending / shard_name(worker, seq, version)
        with atomic.replacing(final) as tmp:
            torch.save(
                {"worker": worker, "seq": seq, "version": version, "trajectories": trajectories},
                tmp,
            )
        return final

    # --- the trainer's side ------------------------------------------------------------------

    def claim(
        self,
        iteration: int,
        count: int,
        min_version: int,
        timeout_s: float,
        poll_s: float = 0.2,
    ) -> list[Path]:
        """`count` shards for `iteration`: those it claimed before a restart first, then the
        oldest acceptable pending ones (versions below `min_version` go to stale/)."""
        self._mkdirs()
        target = self.iteration_dir(iteration)
        target.mkdir(exist_ok=True)
        deadline = time.monotonic() + timeout_s
        while True:
            taken = len(self._shards(target))
            if taken >= count:
                return [s.path for s in self._shards(target)[:count]]
            moved = 0
            for shard in self._shards(self.pending):
                if taken + moved >= count:
                    break
                if shard.version < min_version:
                    os.replace(shard.path, self.stale / shard.path.name)
                    continue
                os.replace(shard.path, target / shard.path.name)
                moved += 1
            if moved:
                deadline = time.monotonic() + timeout_s
                continue
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.pending}: no trajectory shard in {timeout_s:.0f} s for iteration "
                    f"{iteration} ({taken}/{count} claimed): are the rollout workers "
                    "running? (tools/submit.py status RUN_DIR)"
                )
            time.sleep(poll_s)

    def audit(self) -> dict[str, int]:
        """Counts of shards per place; raises if one (worker, number) is in two places or a
        worker's numbers have a gap (a shard lost)."""
        places = {"pending": [self.pending], "stale": [self.stale]}
        places["claimed"] = sorted(self.claimed.glob("iter_*")) if self.claimed.exists() else []
        counts: dict[str, int] = {}
        seen: dict[tuple[int, int], Path] = {}
        for place, folders in places.items():
            counts[place] = 0
            for folder in folders:
                for shard in self._shards(folder):
                    key = (shard.worker, shard.seq)
                    if key in seen:
                        raise AssertionError(f"shard {key} twice: {seen[key]} and {shard.path}")
                    seen[key] = shard.path
                    counts[place] += 1
        for worker in {w for w, _ in seen}:
            numbers = sorted(n for w, n in seen if w == worker)
            if numbers != list(range(len(numbers))):
                missing = sorted(set(range(numbers[-1] + 1)) - set(numbers))
                raise AssertionError(f"worker {worker}: shards {missing} lost")
        return counts

    def finish(self) -> None:
        self._mkdirs()
        (self.root / "DONE").touch()

    def done(self) -> bool:
        return (self.root / "DONE").exists()

    def reopen(self) -> None:
        """A run resumed to train further: workers may produce again."""
        (self.root / "DONE").unlink(missing_ok=True)


def load_shards(paths: list[Path]) -> list[tuple[int, list[Trajectory]]]:
    """(policy version, trajectories) of each shard, in order."""
    out: list[tuple[int, list[Any]]] = []
    for path in paths:
        record = torch.load(path, weights_only=False)
        out.append((record["version"], record["trajectories"]))
    return out
