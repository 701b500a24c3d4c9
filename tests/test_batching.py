"""The PPO update's micro-batch plans (rlef_hpc.rl.batching) and the row lengths they are made
from (rlef_hpc.rl.ppo): every row once, within the token budget, padded only as far as needed."""

from __future__ import annotations

import random

import pytest
import torch

from rlef_hpc.rl import ppo
from rlef_hpc.rl.batching import MicroBatch, bucketed_plan, padding_fraction, round_up, split_to


def rlef_lengths(n: int, seed: int) -> list[int]:
    """One short turn or three long ones, as the demo's episodes (90 to ~520 tokens)."""
    rng = random.Random(seed)
    return [rng.randint(90, 100) if rng.random() < 0.5 else rng.randint(230, 520) for _ in range(n)]


def check_plan(plan: list[MicroBatch], rows: list[int], lengths: list[int], budget, multiple):
    assert sorted(r for m in plan for r in m.rows) == sorted(rows)  # every row, once
    for m in plan:
        assert m.length % multiple == 0
        assert all(lengths[r] <= m.length for r in m.rows)
        assert len(m.rows) == 1 or m.positions <= budget


@pytest.mark.parametrize("budget,multiple", [(1024, 1), (4096, 1), (4096, 16), (300, 8)])
def test_bucketed_plan_covers_every_row_within_the_budget(budget, multiple):
    lengths = rlef_lengths(200, seed=budget + multiple)
    rows = list(range(40, 104))  # a minibatch: some rows of the batch
    plan = bucketed_plan(rows, lengths, budget, multiple)
    check_plan(plan, rows, lengths, budget, multiple)
    assert plan == bucketed_plan(rows, lengths, budget, multiple)  # deterministic


def test_bucketed_plan_pads_little_where_fixed_micro_batches_pad_much():
    lengths = rlef_lengths(64, seed=0)
    rows = list(range(64))
    bucketed = bucketed_plan(rows, lengths, 4096)
    padded = [MicroBatch(tuple(rows[i : i + 8]), max(lengths)) for i in range(0, 64, 8)]
    assert padding_fraction([(bucketed, lengths)]) < 0.1
    assert padding_fraction([(padded, lengths)]) > 0.3


def test_a_row_longer_than_the_budget_runs_alone():
    lengths = [5000, 100, 100, 90]
    plan = bucketed_plan([0, 1, 2, 3], lengths, 1024, multiple=16)
    assert plan[0] == MicroBatch((0,), 5008)
    check_plan(plan, [0, 1, 2, 3], lengths, 1024, 16)


def test_split_to_reaches_the_count_other_ranks_need():
    lengths = rlef_lengths(32, seed=3)
    rows = list(range(32))
    plan = bucketed_plan(rows, lengths, 4096)
    for count in (len(plan), len(plan) + 1, len(plan) + 5, 32):
        split = split_to(plan, count, lengths, multiple=4)
        assert len(split) == count
        check_plan(split, rows, lengths, 4096, 1)
    with pytest.raises(ValueError):
        split_to(plan, 33, lengths)


def test_row_lengths_end_at_the_last_response_or_value_index():
    # Row 0: a turn whose response ends at 6; row 1: one ending at 9; row 2: no response read
    # after its value index 3; tokens after each are never read.
    t = 12
    response = torch.zeros(3, t, dtype=torch.bool)
    response[0, 2:6] = True
    response[1, 5:9] = True
    turn_mask = torch.tensor([[True], [True], [True]])
    value_index = torch.tensor([[1], [4], [3]])
    batch = ppo.PPOBatch(
        tokens=torch.zeros(3, t, dtype=torch.long),
        response_mask=response,
        turn_of_token=torch.where(response, 0, -1),
        value_index=value_index,
        turn_mask=turn_mask,
        turn_reward=torch.zeros(3, 1),
        logp_behaviour=torch.zeros(3, t),
    )
    assert ppo.row_lengths(batch).tolist() == [6, 9, 4]
    assert ppo.value_lengths(batch).tolist() == [2, 5, 4]
    cut = batch.narrow(9)
    assert cut.tokens.shape == (3, 9) and cut.value_index.shape == (3, 1)


def test_round_up():
    assert [round_up(n, 16) for n in (1, 16, 17)] == [16, 16, 32]
