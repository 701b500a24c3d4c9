"""How the PPO update cuts a set of rows (trajectories) into micro-batches: host-side plans of
row indices and padded lengths, made once per step from the rows' lengths (one device sync).

- "padded" (the original path): `micro_batch_size` rows at a time in their given order, every
  one padded to the whole batch's length.
- "bucketed" (the default): rows sorted by length, longest first, cut greedily so that rows x
  padded length stays within `micro_batch_tokens` (at least one row each), each micro-batch
  padded only to its own longest row, rounded up to the model's sequence multiple (FP8,
  sequence parallelism). RLEF episodes run from one short turn to three long ones: padding
  every row to the batch's longest spends most of a pass on padding.

Only the cut into micro-batches changes: which rows form a minibatch is the caller's (a fixed
share of the rollouts in their drawn, seeded-shuffled order), so PPO's minibatches are the
same under both, and so are the losses (every normaliser is a minibatch total, never a
micro-batch mean).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Batching = Literal["padded", "bucketed"]


@dataclass(frozen=True)
class MicroBatch:
    rows: tuple[int, ...]  # indices into the batch
    length: int  # the padded sequence length this micro-batch runs at

    @property
    def positions(self) -> int:
        """Token positions the model processes, padding included."""
        return len(self.rows) * self.length


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def padded_plan(rows: list[int], micro_batch_size: int, length: int) -> list[MicroBatch]:
    """`micro_batch_size` rows at a time, in order, all at the batch's `length`."""
    if len(rows) % micro_batch_size:
        raise ValueError(
            f"{len(rows)} sequences are not a multiple of micro_batch_size={micro_batch_size}"
        )
    return [
        MicroBatch(tuple(rows[i : i + micro_batch_size]), length)
        for i in range(0, len(rows), micro_batch_size)
    ]


def bucketed_plan(
    rows: list[int], lengths: list[int], budget: int, multiple: int = 1
) -> list[MicroBatch]:
    """`rows` sorted by `lengths` (one per row of the batch, indexed by row), longest first,
    cut greedily: a micro-batch takes the next row while rows x its padded length (its first
    row's, rounded up to `multiple`) stays within `budget` tokens. Ties keep the given order,
    so the plan is deterministic."""
    order = sorted(rows, key=lambda r: -lengths[r])
    plan: list[MicroBatch] = []
    current: list[int] = []
    length = 0
    for row in order:
        if current and (len(current) + 1) * length > budget:
            plan.append(MicroBatch(tuple(current), length))
            current = []
        if not current:
            length = round_up(max(lengths[row], 1), multiple)
        current.append(row)
    if current:
        plan.append(MicroBatch(tuple(current), length))
    return plan


def split_to(
    plan: list[MicroBatch], count: int, lengths: list[int], multiple: int = 1
) -> list[MicroBatch]:
    """`plan` cut further into exactly `count` micro-batches (data-parallel ranks must run as
    many as each other: the gradient reduction starts at the last one): the most expensive
    micro-batch of more than one row is halved until there are `count`. Each half is padded to
    its own longest row."""
    if count < len(plan) or count > sum(len(m.rows) for m in plan):
        raise ValueError(f"cannot cut {len(plan)} micro-batches into {count}")
    plan = list(plan)
    while len(plan) < count:
        i = max((j for j, m in enumerate(plan) if len(m.rows) > 1), key=lambda j: plan[j].positions)
        rows = plan[i].rows
        halves = [rows[: len(rows) // 2], rows[len(rows) // 2 :]]
        plan[i : i + 1] = [
            MicroBatch(h, round_up(max(max(lengths[r] for r in h), 1), multiple)) for h in halves
        ]
    return plan


def padding_fraction(plans: list[list[MicroBatch]], lengths: list[int]) -> float:
    """The share of processed positions that are padding, over every micro-batch of `plans`."""
    processed = sum(m.positions for plan in plans for m in plan)
    real = sum(lengths[r] for plan in plans for m in plan for r in m.rows)
    return 1.0 - real / processed if processed else 0.0
