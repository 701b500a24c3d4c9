"""Resharding as a plan (rlef_hpc.checkpoint.reshard), without megatron: saved pieces of global
tensors laid out in bucket tensors, the pieces another layout wants, and the copies the plan
makes, applied here to plain tensors and compared with the global tensors they came from."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from rlef_hpc.checkpoint import reshard
from rlef_hpc.checkpoint.hf_dir import CheckpointError


def save(globals_: dict[str, torch.Tensor], layouts: list[list[tuple[str, tuple, tuple]]]):
    """Bucket tensors and their index, as a checkpoint holds them: per layout, its pieces
    (key, offset, shape) written one after the other into one bucket tensor."""
    index, buckets = [], {}
    for n, pieces in enumerate(layouts):
        name, flat, saved = f"bucket{n}", [], []
        start = 0
        for key, offset, shape in pieces:
            region = tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))
            flat.append(globals_[key][region].reshape(-1))
            numel = torch.Size(shape).numel()
            saved.append(dict(key=key, offset=offset, shape=shape, tensor=name, start=start))
            start += numel
        buckets[name] = torch.cat(flat)
        index.append([reshard.Saved.of({**s, "length": start}) for s in saved])
    return index, buckets


def apply(plan: reshard.Plan, buckets, wanted) -> list[torch.Tensor]:
    """What the apply step does with megatron's reads: each parameter, flattened."""
    reads = {s: buckets[s.tensor][s.start : s.start + s.numel] for s in plan.reads}
    out = []
    for pieces, copies in zip(wanted, plan.copies, strict=True):
        full = torch.full((sum(p.numel for p in pieces),), float("nan"))
        for c in copies:
            target = full[c.target.first : c.target.first + c.target.numel]
            target.view(c.target.shape)[c.into] = reads[c.source].view(c.source.shape)[c.out]
        out.append(full)
    return out


W = torch.arange(24.0).reshape(4, 6)
NORM = torch.arange(6.0) + 100


def test_two_tensor_parallel_shards_merge_into_one():
    # Saved at TP2 (rows split), the norm replicated in both layouts; wanted at TP1.
    index, buckets = save(
        {"w": W, "norm": NORM},
        [
            [("w", (0, 0), (2, 6)), ("norm", (0,), (6,))],
            [("w", (2, 0), (2, 6)), ("norm", (0,), (6,))],
        ],
    )
    wanted = [[reshard.Wanted("w", (0, 0), (4, 6), 0)], [reshard.Wanted("norm", (0,), (6,), 0)]]
    plan = reshard.plan(index, wanted)
    w, norm = apply(plan, buckets, wanted)
    assert torch.equal(w.view(4, 6), W) and torch.equal(norm, NORM)
    assert len(plan.reads) == 3  # both halves of w, one copy of the replicated norm


def test_one_shard_splits_and_each_rank_reads_only_what_it_overlaps():
    index, buckets = save({"w": W}, [[("w", (0, 0), (2, 6))], [("w", (2, 0), (2, 6))]])
    # TP3 over columns would cut across both saved row halves: rank 1 wants columns 2-3.
    wanted = [[reshard.Wanted("w", (0, 2), (4, 2), 0)]]
    plan = reshard.plan(index, wanted)
    (w,) = apply(plan, buckets, wanted)
    assert torch.equal(w.view(4, 2), W[:, 2:4])
    # A rank wanting rows 0-1 only reads the first saved half.
    wanted = [[reshard.Wanted("w", (0, 0), (2, 6), 0)]]
    assert [s.offset for s in reshard.plan(index, wanted).reads] == [(0, 0)]


def test_a_parameter_of_two_pieces_fills_both():
    # The SwiGLU fc1 weight: a TP-local parameter is two pieces of two global tensors, one
    # after the other in the flattened parameter.
    gate, up = W[:, :3].contiguous(), W[:, 3:].contiguous() + 50
    index, buckets = save(
        {"gate": gate, "up": up}, [[("gate", (0, 0), (4, 3)), ("up", (0, 0), (4, 3))]]
    )
    wanted = [[reshard.Wanted("gate", (2, 0), (2, 3), 0), reshard.Wanted("up", (2, 0), (2, 3), 6)]]
    (param,) = apply(reshard.plan(index, wanted), buckets, wanted)
    assert torch.equal(param, torch.cat([gate[2:].reshape(-1), up[2:].reshape(-1)]))


def test_a_piece_the_checkpoint_does_not_cover_is_refused():
    index, _ = save({"w": W}, [[("w", (0, 0), (2, 6))]])  # the other half is missing
    wanted = [[reshard.Wanted("w", (0, 0), (4, 6), 0)]]
    with pytest.raises(CheckpointError, match=r"does not cover w at \[0, 0\] \[4, 6\]"):
        reshard.plan(index, wanted)


def test_the_plan_needs_no_megatron():
    code = (
        "import sys, rlef_hpc.checkpoint.reshard; "
        "sys.exit(any(m.startswith('megatron') for m in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
