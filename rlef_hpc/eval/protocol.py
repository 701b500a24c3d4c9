"""The paper's evaluation protocol: what one evaluation samples.

On each evaluation set (valid, test, optional HumanEval+/MBPP+ files), every metric (n@k) from
rollouts sampled as that metric says (1@3 at temperature 0.2, 10@100 at 1.0 and top-p 0.95):
one set of `rollouts` rollouts per problem per distinct sampling (a Draw), shared by the
metrics that sample alike. rlef_hpc.eval.evaluator runs the draws; rlef_hpc.eval.report
estimates each draw's metrics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from rlef_hpc.data.problem import Problem
from rlef_hpc.eval.metrics import parse_metric


@dataclass(frozen=True)
class MetricSpec:
    """One n@k solve rate and how its rollouts are sampled."""

    name: str = "1@3"
    temperature: float = 0.2
    top_p: float = 0.95

    def __post_init__(self) -> None:
        parse_metric(self.name)  # a malformed name is refused with the config, not mid-run
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(
                f"metric {self.name}: temperature must be >= 0 and top_p in (0, 1], got "
                f"{self.temperature}, {self.top_p}"
            )

    @property
    def sampling(self) -> tuple[float, float]:
        return (self.temperature, self.top_p)


# The paper's: 1@3 at temperature 0.2; 10@100 at 1.0, top-p 0.95 (needs 33 rollouts/problem).
PAPER_METRICS = (MetricSpec("1@3", 0.2, 0.95), MetricSpec("10@100", 1.0, 0.95))


def by_sampling(metrics: Sequence[MetricSpec]) -> dict[tuple[float, float], list[str]]:
    """Metric names grouped by their sampling, in the order first named: one set of rollouts
    per group."""
    groups: dict[tuple[float, float], list[str]] = {}
    for m in metrics:
        groups.setdefault(m.sampling, []).append(m.name)
    return groups


def min_rollouts(metrics: Sequence[MetricSpec], max_turns: int) -> int:
    """The fewest rollouts per problem that estimate every metric (10@100, 3 turns: 33)."""
    return max(parse_metric(m.name)[1] // max_turns for m in metrics)


@dataclass(frozen=True)
class Draw:
    """One set of rollouts of an evaluation: which problems (each repeated once per rollout),
    sampled how, under which seed key, for which metrics."""

    set_name: str
    problems: list[Problem]
    temperature: float
    top_p: float
    key: str
    metrics: list[str]


def draws(
    sets: Mapping[str, Sequence[Problem]],
    metrics: Sequence[MetricSpec],
    rollouts: int,
    tag: str,
) -> list[Draw]:
    """The rollouts one evaluation generates, in order: per non-empty set, one draw per
    distinct sampling, its seed key `TAG-SET-tTEMPERATURE-pTOP_P` (a trainer's tag is
    `eval-ITERATION`: a redone evaluation samples what the first one did)."""
    out = []
    for name, problems in sets.items():
        if not problems:
            continue
        repeated = [p for p in problems for _ in range(rollouts)]
        for (temperature, top_p), names in by_sampling(metrics).items():
            key = f"{tag}-{name}-t{temperature}-p{top_p}"
            out.append(Draw(name, repeated, temperature, top_p, key, names))
    return out
