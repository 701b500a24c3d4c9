"""How the PPO update cuts a set of rows (trajectories) into micro-batches: host-side plans of
row indices and padded lengths, made once per step from the rows' lengths (one device sync).

- "padded" (the original path): `micro_batch_size` rows at a time in their given order, every
  one padded to the whole batch's length.
- "bucketed" (the default): rows sorted by length, longest first, cut (where: a small dynamic
  program, `bucketed_plan`) so that rows x padded length stays within `micro_batch_tokens`
  (at least one row each), each micro-batch
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


# What one more micro-batch costs, in positions, as a share of the budget: its fixed costs
# (the schedule's and megatron's per-call Python, kernel launches, the logits' chunks). A cut
# that saves less padding than this is not worth making.
OVERHEAD_SHARE = 1 / 16


def bucketed_plan(
    rows: list[int], lengths: list[int], budget: int, multiple: int = 1
) -> list[MicroBatch]:
    """`rows` sorted by `lengths` (one per row of the batch, indexed by row), longest first,
    cut into runs of at most `budget` tokens (rows x the run's padded length, its first row's
    rounded up to `multiple`; a row longer than the budget runs alone). Where to cut is chosen
    to minimise the positions run, padding included, plus `OVERHEAD_SHARE` of the budget per
    micro-batch (a dynamic program over the sorted rows: O(rows x rows per micro-batch)).
    Ties keep the given order, so the plan is deterministic."""
    order = sorted(rows, key=lambda r: -lengths[r])
    padded = [round_up(max(lengths[r], 1), multiple) for r in order]
    overhead = budget * OVERHEAD_SHARE
    n = len(order)
    # best[j]: the cheapest cut of the first j rows, ending a micro-batch at j; start[j]: where
    # that micro-batch starts.
    best = [0.0] + [float("inf")] * n
    start = [0] * (n + 1)
    for i in range(n):  # a micro-batch starting at row i runs at padded[i]
        for j in range(i + 1, n + 1):
            if j - i > 1 and (j - i) * padded[i] > budget:
                break
            cost = best[i] + (j - i) * padded[i] + overhead
            if cost < best[j]:
                best[j], start[j] = cost, i
    plan: list[MicroBatch] = []
    j = n
    while j > 0:
        i = start[j]
        plan.append(MicroBatch(tuple(order[i:j]), padded[i]))
        j = i
    return plan[::-1]


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


def padding_fraction(passes: list[tuple[list[MicroBatch], list[int]]]) -> float:
    """The share of processed positions that no loss reads, over passes given as (plan, the
    positions each row needs in that pass)."""
    processed = sum(m.positions for plan, _ in passes for m in plan)
    needed = sum(lengths[r] for plan, lengths in passes for m in plan for r in m.rows)
    return 1.0 - needed / processed if processed else 0.0
