"""Seeds derived from names: the same (run seed, purpose, rank...) always gives the same seed,
and different ones independent seeds. Sampling draws from torch's generator, so seeding it
from such a name makes a sequence of generations reproducible (a resumed run, a regenerated
shard)."""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from the parts, joined by ':' (so `derive_seed(0, "train3", 1)` names
    run seed 0, iteration 3's episodes, rank 1)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") % (1 << 63)


def seed_sampling(*parts: object) -> None:
    """Seeds torch's global generator (the one vLLM's sampler draws from) by name."""
    torch.manual_seed(derive_seed(*parts))
