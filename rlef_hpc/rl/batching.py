"""How the PPO update cuts a step's rows (trajectories) into micro-batches: host-side plans of
row indices and padded lengths, made once per step from the rows' lengths (one device sync),
then the micro-batches' tensors cut from the batch.

Rows are sorted by length, longest first, and cut (where: a small dynamic program,
`bucketed_plan`) so that rows x padded length stays within a token budget
(`update.micro_batch_tokens`; at least one row each), each micro-batch padded only to its own
longest row, rounded up to the model's sequence multiple (FP8, sequence parallelism). RLEF
episodes run from one short turn to three long ones: padding every row to the batch's longest
spends most of a pass on padding. A row's length is what its losses read (rl.ppo.row_lengths,
value_lengths): under causal attention nothing after it changes them.

Only the cut into micro-batches is chosen here: which rows form a minibatch is the caller's (a
fixed share of the rollouts in their drawn, seeded-shuffled order), and every loss normaliser
is a minibatch total, never a micro-batch mean, so any cut gives the same losses.

The policy's logits are needed only where they predict a response token (a sixth of the demo's
positions): each micro-batch carries those positions (`Response`), which the update passes to
the model's forward (rl.passes) so that the output layer computes nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from rlef_hpc.rl import ppo


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


@dataclass(frozen=True)
class Response:
    """A micro-batch's response tokens, k per row (k: its rows' most; rows with fewer are
    filled with positions outside their responses, `valid` False), and where the logits that
    predict them are: the hidden state one position before each, as an index into the hidden
    states [s, b] flattened (megatron's sequence-first layout)."""

    positions: torch.Tensor  # [rows, k]
    valid: torch.Tensor  # [rows, k]
    logit_index: torch.Tensor  # [rows * k]


@dataclass(frozen=True)
class Responses:
    """Every row's response positions first, in order, then the rest ([B, T]); how many."""

    order: torch.Tensor
    counts: torch.Tensor  # [B], on the device
    host_counts: list[int]

    def part(self, m: MicroBatch, rows: torch.Tensor) -> Response:
        """Micro-batch `m`'s (its `rows` as a device tensor)."""
        k = max(1, max(self.host_counts[r] for r in m.rows))
        positions = self.order[rows, :k]
        valid = torch.arange(k, device=rows.device) < self.counts[rows, None]
        index = (positions - 1).clamp(min=0) * len(m.rows)
        index = index + torch.arange(len(m.rows), device=rows.device)[:, None]
        return Response(positions, valid, index.flatten())


# The kinds of pass a step plans: the policy's (and the frozen reference's, on the same
# micro-batches), and the value model's, whose rows stop at their last value index.
KINDS = ("policy", "value")


@dataclass(frozen=True)
class StepPlan:
    """A step's micro-batches, per kind of pass (KINDS): for the whole batch (the forward-only
    passes before the update) and for each minibatch, with the positions each row needs."""

    lengths: dict[str, list[int]]
    prepare: dict[str, list[MicroBatch]]
    minibatches: dict[str, list[list[MicroBatch]]]
    responses: Responses

    def padding_fraction(self) -> float:
        """Padding's share of the positions the step's passes run: the policy, the reference
        and the value model over the batch, then the policy and value over each minibatch."""
        passes = [(self.prepare[k], self.lengths[k]) for k in ("policy", "policy", "value")]
        passes += [(p, self.lengths[k]) for k, plans in self.minibatches.items() for p in plans]
        return padding_fraction(passes)


def plan_step(
    batch: ppo.PPOBatch,
    num_minibatches: int,
    budget: int,
    multiple: int = 1,
    group: Any = None,
) -> StepPlan:
    """Every micro-batch of a PPO step on `batch` (this data-parallel rank's share; minibatch
    m is its m-th contiguous block of rows), within `budget` tokens each, from one read of the
    rows' lengths (the plan's only device sync). With a data-parallel `group` of more than one
    rank, each minibatch gets as many micro-batches on every rank (one all-reduce)."""
    b, t = batch.tokens.shape
    if b % num_minibatches:
        raise ValueError(f"{b} sequences do not split into {num_minibatches} minibatches")
    if t % multiple:
        raise ValueError(
            f"sequences of {t} tokens: the model needs multiples of {multiple} "
            "(collate(..., multiple=sequence_multiple(config)))"
        )
    size = b // num_minibatches
    counts = batch.response_mask.sum(1)
    policy, value, host_counts = torch.stack(
        [ppo.row_lengths(batch), ppo.value_lengths(batch), counts]
    ).tolist()
    lengths = {"policy": policy, "value": value}
    response_first = (~batch.response_mask).to(torch.int32)
    responses = Responses(torch.argsort(response_first, dim=1, stable=True), counts, host_counts)
    minibatches = {
        k: [
            bucketed_plan(list(range(m * size, (m + 1) * size)), lengths[k], budget, multiple)
            for m in range(num_minibatches)
        ]
        for k in KINDS
    }
    return StepPlan(
        lengths,
        {k: bucketed_plan(list(range(b)), lengths[k], budget, multiple) for k in KINDS},
        _same_count(minibatches, lengths, multiple, group, batch.tokens.device),
        responses,
    )


def _same_count(
    plans: dict[str, list[list[MicroBatch]]],
    lengths: dict[str, list[int]],
    multiple: int,
    group: Any,
    device: torch.device,
) -> dict[str, list[list[MicroBatch]]]:
    """The minibatches' plans (per kind) with as many micro-batches on every data-parallel
    rank as on the one that needs most (one all-reduce for all of them): the schedules run
    no-sync until their last micro-batch, where the gradient reduction starts, and every rank
    must start it together."""
    if group is None or dist.get_world_size(group) == 1:
        return plans
    kinds = list(plans)
    counts = torch.tensor([[len(p) for p in plans[k]] for k in kinds], device=device)
    dist.all_reduce(counts, op=dist.ReduceOp.MAX, group=group)
    return {
        k: [split_to(p, n, lengths[k], multiple) for p, n in zip(plans[k], row, strict=True)]
        for k, row in zip(kinds, counts.tolist(), strict=True)
    }


@dataclass(frozen=True)
class Part:
    """One micro-batch on the device: its rows of the batch cut to its length, their indices
    into the batch, where the policy's logits are needed (None: everywhere), and (in the
    update, on the last pipeline stage) what its losses compare against."""

    batch: ppo.PPOBatch
    rows: torch.Tensor
    response: Response | None = None
    targets: ppo.Targets | None = None


def cut(
    batch: ppo.PPOBatch,
    plan: list[MicroBatch],
    responses: Responses | None = None,
    prepared: ppo.Prepared | None = None,
    minibatch: int = 0,
) -> list[Part]:
    """`plan`'s micro-batches of `batch` (with `responses`, where the policy's logits are
    needed; with `prepared`, each one's targets, of minibatch `minibatch`): the row indices go
    to the batch's device in one copy; each part is cut to its length before its rows are
    gathered, so only what it runs is copied."""
    index = torch.tensor([r for m in plan for r in m.rows], device=batch.tokens.device)
    parts, start = [], 0
    for m in plan:
        rows = index[start : start + len(m.rows)]
        start += len(m.rows)
        parts.append(
            Part(
                batch.narrow(m.length).select(rows),
                rows,
                responses.part(m, rows) if responses is not None else None,
                prepared.targets(rows, m.length, minibatch) if prepared is not None else None,
            )
        )
    return parts
