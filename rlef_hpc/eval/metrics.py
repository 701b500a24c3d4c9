"""Solve-rate estimators: pass@k (Chen et al., 2021) and n@k (Li et al., 2022) with RLEF's
accounting, where every turn is a sample: 1@3 is one 3-turn rollout, 10@100 is 33 rollouts
whose final answers are filtered by the public tests before (up to) 10 are submitted.

All estimates are exact expectations over which rollouts (of those available per problem)
the budget would have drawn; no sampling noise beyond the bootstrap over problems.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import comb

import numpy as np


@dataclass(frozen=True)
class RolloutOutcome:
    """What n@k needs of one rollout: its final answer against public and all tests."""

    passed_public: bool
    correct: bool  # passed public and private tests
    turns: int

    def __post_init__(self) -> None:
        if self.correct and not self.passed_public:
            raise ValueError("a correct answer passes the public tests too")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples, drawn from n of which c are correct, is."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= correct <= samples, got correct={c}, samples={n}")
    if n < k:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    return 1.0 - comb(n - c, k) / comb(n, k)


def _hypergeom(population: int, successes: int, draws: int, hits: int) -> float:
    return (
        comb(successes, hits) * comb(population - successes, draws - hits) / comb(population, draws)
    )


def n_at_k(outcomes: Sequence[RolloutOutcome], n: int, k: int, max_turns: int) -> float:
    """Expected n@k for one problem from its rollouts: k samples buy k // max_turns rollouts;
    of their final answers, those passing the public tests are candidates, and up to n of
    them (chosen at random) are submitted; the problem is solved if one is correct."""
    rollouts = k // max_turns
    if rollouts < 1:
        raise ValueError(f"a budget of {k} samples is less than one {max_turns}-turn rollout")
    total = len(outcomes)
    if total < rollouts:
        raise ValueError(f"{n}@{k} needs {rollouts} rollouts per problem, got {total}")
    public = sum(o.passed_public for o in outcomes)
    correct = sum(o.correct for o in outcomes)
    solved = 0.0
    for p in range(min(public, rollouts) + 1):  # public-passing answers among those drawn
        p_prob = _hypergeom(total, public, rollouts, p)
        if p == 0 or p_prob == 0.0:
            continue
        submitted = min(n, p)
        for c in range(min(correct, p) + 1):  # correct among the public-passing drawn
            c_prob = _hypergeom(public, correct, p, c)
            solved += p_prob * c_prob * (1.0 - comb(p - c, submitted) / comb(p, submitted))
    return solved


def solved_by_turn(outcomes: Sequence[RolloutOutcome], max_turns: int) -> list[float]:
    """Fraction of rollouts solved at turn t or before, for t = 1..max_turns (episodes stop at
    the first answer passing the public tests, so a correct episode ends at its solving turn)."""
    return [
        sum(o.correct and o.turns <= t for o in outcomes) / len(outcomes)
        for t in range(1, max_turns + 1)
    ]


def bootstrap_ci(
    per_problem: Sequence[float], resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high): the mean over problems and a percentile bootstrap interval."""
    values = np.asarray(per_problem, dtype=float)
    if values.size == 0:
        raise ValueError("no problems to estimate over")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    alpha = (1.0 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(values.mean()), float(low), float(high)


def parse_metric(name: str) -> tuple[int, int]:
    """'10@100' -> (10, 100)."""
    try:
        n, k = (int(x) for x in name.split("@"))
    except ValueError:
        raise ValueError(f"metric {name!r} is not of the form n@k (e.g. 1@3, 10@100)") from None
    if n < 1 or k < 1:
        raise ValueError(f"metric {name!r}: n and k must be positive")
    return n, k
