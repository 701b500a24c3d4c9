"""Resharding the distributed optimizer's state, as a plan: which saved pieces each of this
rank's parameters reads, and which region of each goes where. Pure: no megatron, no I/O, no
collectives; the apply step (rlef_hpc.checkpoint.training) reads what the plan says and copies.

A checkpoint's bucket index records, per parameter piece, the region of its global tensor
(key, offset, shape) and where its optimizer state lies in a saved bucket tensor (tensor,
length, start). A rank at another TP x PP (or bucket) layout wants other regions of the same
global tensors; each wanted piece must be covered by the saved pieces it overlaps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rlef_hpc.checkpoint.hf_dir import CheckpointError

Box = tuple[tuple[int, int], ...]  # per axis of a global tensor: [start, end)


@dataclass(frozen=True)
class Saved:
    """A piece of a global tensor whose optimizer state a checkpoint holds, laid out row-major
    in the saved bucket tensor `tensor` (of `length` elements) from element `start`."""

    key: str
    offset: tuple[int, ...]
    shape: tuple[int, ...]
    tensor: str
    length: int
    start: int

    @classmethod
    def of(cls, record: Mapping[str, Any]) -> Saved:
        """From the checkpoint's bucket index (plain dicts: no class of ours in a pickle)."""
        return cls(
            record["key"],
            tuple(record["offset"]),
            tuple(record["shape"]),
            record["tensor"],
            record["length"],
            record["start"],
        )

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Wanted:
    """A piece of a global tensor this rank's parameter holds, from element `first` of the
    flattened parameter (row-major)."""

    key: str
    offset: tuple[int, ...]
    shape: tuple[int, ...]
    first: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Copy:
    """`source[out]` (the saved piece viewed at its shape) goes to `target[into]`."""

    source: Saved
    out: tuple[slice, ...]
    target: Wanted
    into: tuple[slice, ...]


@dataclass(frozen=True)
class Plan:
    reads: tuple[Saved, ...]  # every saved piece to read, once
    copies: tuple[tuple[Copy, ...], ...]  # per wanted parameter, in order


def overlap(a: Saved | Wanted, b: Saved | Wanted) -> Box | None:
    """The region two pieces of one global tensor share, or None."""
    box = []
    for oa, sa, ob, sb in zip(a.offset, a.shape, b.offset, b.shape, strict=True):
        lo, hi = max(oa, ob), min(oa + sa, ob + sb)
        if lo >= hi:
            return None
        box.append((lo, hi))
    return tuple(box)


def within(box: Box, piece: Saved | Wanted) -> tuple[slice, ...]:
    """`box` (global coordinates) as an index into `piece`."""
    return tuple(slice(lo - o, hi - o) for (lo, hi), o in zip(box, piece.offset, strict=True))


def sources(index: Iterable[Iterable[Saved]]) -> dict[str, list[Saved]]:
    """The saved pieces of each global tensor, over every saved bucket layout. A piece
    replicated over TP ranks (the norms) is in each of their layouts: one copy serves."""
    found: dict[str, dict[tuple[int, ...], Saved]] = {}
    for layout in index:
        for piece in layout:
            found.setdefault(piece.key, {}).setdefault(piece.offset, piece)
    return {key: list(pieces.values()) for key, pieces in found.items()}


def plan(index: Iterable[Iterable[Saved]], wanted: Sequence[Sequence[Wanted]]) -> Plan:
    """For each wanted parameter (its pieces), the copies that fill them from the saved
    pieces they overlap (whole saved pieces are read: a changed TP split reads the
    neighbouring shard too), and the saved pieces to read. Raises CheckpointError where the
    saved state does not cover a wanted piece."""
    by_key = sources(index)
    reads: dict[Saved, None] = {}  # ordered, unique
    copies = []
    for pieces in wanted:
        mine = []
        for target in pieces:
            covered = 0
            for source in by_key.get(target.key, ()):
                box = overlap(target, source)
                if box is None:
                    continue
                covered += math.prod(hi - lo for lo, hi in box)
                mine.append(Copy(source, within(box, source), target, within(box, target)))
                reads[source] = None
            if covered != target.numel:
                raise CheckpointError(
                    f"the saved optimizer state does not cover {target.key} at "
                    f"{list(target.offset)} {list(target.shape)}"
                )
        copies.append(tuple(mine))
    return Plan(tuple(reads), tuple(copies))
