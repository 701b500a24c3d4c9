"""The evaluation protocol: 10@100 against brute force, metrics from their own sampling's
rollouts, the run's results table (idempotent appends, selection, curve files) and which
checkpoints are due, pending and protected."""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
from fractions import Fraction

import pytest

from rlef_hpc.checkpoint import training
from rlef_hpc.checkpoint.retention import pending
from rlef_hpc.data.problem import Problem
from rlef_hpc.eval.evaluator import checkpoint_result, evaluate, record
from rlef_hpc.eval.metrics import RolloutOutcome, n_at_k
from rlef_hpc.eval.protocol import PAPER_METRICS, MetricSpec, by_sampling, min_rollouts
from rlef_hpc.eval.results import CheckpointResult, best, evaluated, read_best, read_results
from rlef_hpc.eval.tables import curve_table
from rlef_hpc.train.evaluation import protected
from tests.helpers import eval_result, trajectory


def brute_force_n_at_k(outcomes: list[RolloutOutcome], n: int, k: int, max_turns: int) -> Fraction:
    """Exact n@k by enumeration, in rationals: every draw of the rollouts that k samples buy
    (each rollout costs max_turns samples, whatever turn it stopped at), then every choice of
    the min(n, candidates) answers submitted among the drawn answers that pass the public
    tests; the problem is solved when a submitted answer is correct."""
    draws = list(itertools.combinations(range(len(outcomes)), k // max_turns))
    solved = Fraction(0)
    for draw in draws:
        candidates = [i for i in draw if outcomes[i].passed_public]
        if not candidates:
            continue
        choices = list(itertools.combinations(candidates, min(n, len(candidates))))
        hits = sum(any(outcomes[i].correct for i in c) for c in choices)
        solved += Fraction(hits, len(choices))
    return solved / len(draws)


RIGHT = RolloutOutcome(True, True, 1)
PUBLIC_ONLY = RolloutOutcome(True, False, 2)
FAILED = RolloutOutcome(False, False, 3)


@pytest.mark.parametrize(
    ("right", "public_only", "failed"),
    [
        (1, 11, 23),  # 35 rollouts: more candidates (up to 12) than submissions (10)
        (2, 10, 24),  # 36: two right answers among many public-only ones
        (0, 5, 30),  # nothing right: 0
        (3, 4, 28),  # 35: fewer candidates than submissions, so every candidate is submitted
    ],
)
def test_10_at_100_matches_enumeration_with_33_rollouts_drawn(right, public_only, failed):
    """10@100 with 3-turn rollouts: 100 samples buy 33 rollouts of the 35-36 per problem."""
    outcomes = [RIGHT] * right + [PUBLIC_ONLY] * public_only + [FAILED] * failed
    random.Random(right).shuffle(outcomes)  # the order of rollouts must not matter
    exact = brute_force_n_at_k(outcomes, 10, 100, 3)
    assert n_at_k(outcomes, 10, 100, 3) == pytest.approx(float(exact), abs=1e-12)
    if right == 0:
        assert exact == 0
    if right and right + public_only <= 10:  # every candidate submitted: solved unless all
        missing = outcomes.count(RIGHT)  # the right ones are among the undrawn
        assert exact == 1 - Fraction(_undrawn_all(len(outcomes), missing, 33))


def _undrawn_all(total: int, right: int, drawn: int) -> Fraction:
    """Probability that all `right` rollouts are among the total - drawn left undrawn."""
    left = total - drawn
    p = Fraction(1)
    for i in range(right):
        p *= Fraction(left - i, total - i)
    return p


def test_10_at_100_needs_33_rollouts():
    assert min_rollouts(PAPER_METRICS, 3) == 33
    with pytest.raises(ValueError, match="10@100 needs 33 rollouts per problem, got 32"):
        n_at_k([RIGHT] * 32, 10, 100, 3)


# --- one checkpoint's evaluation -------------------------------------------------------------


def problem(name: str) -> Problem:
    return Problem(name, f"solve {name}", (), ())


class FakeEngine:
    """Generate: at low temperature every rollout of `easy` is solved at turn 2 and others
    fail; at high temperature everything fails. Records each call's sampling."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, float, int, str]] = []

    def __call__(self, problems, temperature, top_p, key, stop=None):
        self.calls.append((temperature, top_p, len(problems), key))
        low = temperature < 0.5
        return [
            trajectory(p.name, low and p.name == "easy", 2 if low and p.name == "easy" else 3)
            for p in problems
        ]


def test_metrics_come_from_their_own_samplings_rollouts():
    engine = FakeEngine()
    metrics = [MetricSpec("1@3", 0.2, 0.95), MetricSpec("10@12", 1.0, 0.95),
               MetricSpec("1@6", 0.2, 0.95)]  # fmt: skip
    assert by_sampling(metrics) == {(0.2, 0.95): ["1@3", "1@6"], (1.0, 0.95): ["10@12"]}
    sets = {"valid": [problem("easy"), problem("hard")], "test": [problem("hard")], "none": []}
    draws = evaluate(engine, sets, metrics, 4, 3, tag="eval-5")
    result = checkpoint_result(5, "iter_5", draws)
    # One set of rollouts per sampling per set, 4 per problem: not one per metric.
    assert sorted((t, p, n) for t, p, n, _ in engine.calls) == [
        (0.2, 0.95, 4), (0.2, 0.95, 8), (1.0, 0.95, 4), (1.0, 0.95, 8)
    ]  # fmt: skip
    assert len({key for *_, key in engine.calls}) == 4  # each draw seeded apart
    assert set(result.sets) == {"valid", "test"}  # an empty set is not evaluated
    valid = result.sets["valid"]
    assert valid.metrics["1@3"].mean == pytest.approx(0.5)  # easy solved, hard not
    assert valid.metrics["1@6"].mean == pytest.approx(0.5)
    assert valid.metrics["10@12"].mean == 0.0  # sampled at 1.0, where nothing solves
    assert valid.metrics["10@12"].temperature == 1.0
    low = next(s for s in valid.samplings if s.temperature == 0.2)
    assert low.solved_by_turn == pytest.approx([0.0, 0.5, 0.5])
    assert low.rollouts_per_problem == 4 and low.metrics == ["1@3", "1@6"]
    assert result.sets["test"].metrics["1@3"].mean == 0.0
    # A results.jsonl line, and back: the typed record is all the file holds.
    line = json.loads(json.dumps(result.to_json()))
    assert CheckpointResult.from_json(line) == result
    assert line["sets"]["valid"]["metrics"]["1@3"]["mean"] == pytest.approx(0.5)


# --- the run's table ---------------------------------------------------------------------


def result(iteration: int, valid: float, test: float) -> CheckpointResult:
    means = {"valid": {"1@3": valid, "10@100": valid + 0.2}, "test": {"1@3": test}}
    return eval_result(iteration, means)


def test_results_are_appended_once_per_checkpoint_and_select_on_valid(tmp_path):
    assert record(tmp_path, result(0, 0.10, 0.12), "1@3")
    assert record(tmp_path, result(20, 0.30, 0.20), "1@3")
    assert record(tmp_path, result(10, 0.25, 0.40), "1@3")  # best on test, not on valid
    assert not record(tmp_path, result(20, 0.99, 0.99), "1@3")  # redone after a requeue
    assert [r.iteration for r in read_results(tmp_path)] == [0, 10, 20]
    assert read_results(tmp_path)[2].estimate("1@3").mean == 0.30
    assert evaluated(tmp_path) == {0, 10, 20}
    chosen = read_best(tmp_path)
    assert chosen.result.iteration == 20 and chosen.metric == "1@3"
    assert chosen.result.estimate("1@3", "test").mean == 0.20  # its test numbers
    table = (tmp_path / "eval" / "curve.md").read_text()
    assert "| 20 (best) | 30.0% [25.0, 35.0] | 50.0% [45.0, 55.0] | 20.0% [15.0, 25.0] |" in table
    assert table.splitlines()[0] == "| iteration | valid 1@3 | valid 10@100 | test 1@3 |"
    png = (tmp_path / "eval" / "curve.png").read_bytes()
    assert png.startswith(b"\x89PNG")


def test_selection_metric_ties_and_absence():
    records = [result(0, 0.1, 0.1), result(10, 0.3, 0.1), result(20, 0.3, 0.5)]
    assert best(records, "1@3").iteration == 10  # a tie: the earlier checkpoint
    records.append(result(30, 0.2, 0.1))
    records[-1].sets["valid"].metrics["10@100"] = dataclasses.replace(
        records[-1].sets["valid"].metrics["10@100"], mean=0.9
    )
    assert best(records, "10@100").iteration == 30
    assert best(records, "1@100") is None
    assert "best" not in curve_table(records, "1@100")


def test_due_pending_and_protected_checkpoints(tmp_path):
    # eval_every=4 over a 10-iteration run: 0, 4, 8 and the last, 10, are due.
    checkpoints = [3, 4, 5, 6, 7, 8, 9, 10]
    assert pending(checkpoints, done=[], eval_every=4, last=10) == [4, 8, 10]
    assert pending(checkpoints, done=[4, 10], eval_every=4, last=10) == [8]
    assert pending(checkpoints, done=[], eval_every=0, last=10) == [10]  # only the last
    for i in checkpoints:
        (tmp_path / f"iter_{i:07d}").mkdir()
        (tmp_path / f"iter_{i:07d}" / training.STATE).write_text("state")
    record(tmp_path, result(4, 0.5, 0.1), "1@3")
    record(tmp_path, result(0, 0.2, 0.1), "1@3")
    # 4 is evaluated and best; 8 still waits for its evaluation.
    assert protected(tmp_path, "1@3", 4, 10) == {4, 8, 10}
    record(tmp_path, result(8, 0.6, 0.1), "1@3")
    assert protected(tmp_path, "1@3", 4, 10) == {8, 10}
