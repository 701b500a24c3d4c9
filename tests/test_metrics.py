"""Estimators against hand-computed values, brute-force enumeration and their closed forms."""

from __future__ import annotations

import itertools
import random

import pytest

from rlef_hpc.eval.metrics import (
    RolloutOutcome,
    bootstrap_ci,
    n_at_k,
    parse_metric,
    pass_at_k,
    solved_by_turn,
)

RIGHT = RolloutOutcome(True, True, 1)
PUBLIC_ONLY = RolloutOutcome(True, False, 1)
FAILED = RolloutOutcome(False, False, 3)


def test_pass_at_k_hand_computed():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(4, 0, 2) == 0.0  # none correct
    assert pass_at_k(4, 4, 3) == 1.0  # all correct
    assert pass_at_k(4, 3, 2) == 1.0  # n - c < k: a correct one is always drawn
    with pytest.raises(ValueError, match="pass@5 needs at least 5 samples per problem, got 3"):
        pass_at_k(3, 1, 5)


def brute_force_n_at_k(outcomes, n, k, max_turns):
    """Every draw of k // max_turns rollouts, every choice of n submissions among candidates."""
    m = k // max_turns
    total = 0.0
    draws = list(itertools.combinations(range(len(outcomes)), m))
    for draw in draws:
        candidates = [outcomes[i] for i in draw if outcomes[i].passed_public]
        if not candidates:
            continue
        choices = list(itertools.combinations(candidates, min(n, len(candidates))))
        total += sum(any(o.correct for o in c) for c in choices) / len(choices)
    return total / len(draws)


@pytest.mark.parametrize("seed", range(30))
def test_n_at_k_matches_enumeration(seed):
    rng = random.Random(seed)
    outcomes = [rng.choice([RIGHT, PUBLIC_ONLY, FAILED]) for _ in range(rng.randint(3, 8))]
    max_turns = rng.choice([1, 3])
    k = max_turns * rng.randint(1, len(outcomes))
    n = rng.randint(1, 4)
    assert n_at_k(outcomes, n, k, max_turns) == pytest.approx(
        brute_force_n_at_k(outcomes, n, k, max_turns)
    )


def test_n_at_k_closed_forms():
    outcomes = [RIGHT, RIGHT, PUBLIC_ONLY, FAILED, FAILED]
    # 1@3 with 3 turns: one rollout, its answer submitted if it passes public: correct rate.
    assert n_at_k(outcomes, 1, 3, 3) == pytest.approx(2 / 5)
    # n >= rollouts: every candidate is submitted, so it is pass@m on correctness.
    assert n_at_k(outcomes, 10, 9, 3) == pytest.approx(pass_at_k(5, 2, 3))
    # 1@6: two rollouts, one submission chosen among the public-passing ones.
    assert n_at_k([RIGHT, PUBLIC_ONLY], 1, 6, 3) == pytest.approx(0.5)
    assert n_at_k([RIGHT, FAILED], 1, 6, 3) == pytest.approx(1.0)  # filtering helps


def test_n_at_k_edges():
    assert n_at_k([FAILED] * 4, 1, 3, 3) == 0.0
    assert n_at_k([RIGHT] * 4, 10, 12, 3) == 1.0
    with pytest.raises(ValueError, match="10@100 needs 33 rollouts per problem, got 5"):
        n_at_k([RIGHT] * 5, 10, 100, 3)
    with pytest.raises(ValueError, match="less than one 3-turn rollout"):
        n_at_k([RIGHT], 1, 2, 3)
    with pytest.raises(ValueError, match="passes the public tests too"):
        RolloutOutcome(False, True, 1)


def test_solved_by_turn_is_cumulative():
    outcomes = [RolloutOutcome(True, True, 1), RolloutOutcome(True, True, 3), FAILED, FAILED]
    assert solved_by_turn(outcomes, 3) == [0.25, 0.25, 0.5]


def test_bootstrap_interval_contains_the_mean_and_narrows_with_more_problems():
    few = [1.0, 0.0, 1.0, 0.0]
    many = few * 50
    mean, low, high = bootstrap_ci(few)
    assert mean == 0.5 and low < 0.5 < high
    _, low2, high2 = bootstrap_ci(many)
    assert high2 - low2 < (high - low) / 3
    assert bootstrap_ci(few, seed=1) == bootstrap_ci(few, seed=1)
    assert bootstrap_ci([1.0] * 5)[1:] == (1.0, 1.0)


def test_metric_names():
    assert parse_metric("10@100") == (10, 100)
    with pytest.raises(ValueError, match="not of the form n@k"):
        parse_metric("pass@1")


def test_a_rollout_the_sandbox_failed_to_judge_is_scored_a_failure_and_reported():
    """Whatever else its record says, a rollout with a sandbox error never counts as solved;
    the report counts such rollouts and says how they were scored."""
    from rlef_hpc.data.trajectory import Trajectory, Turn
    from rlef_hpc.eval.report import outcomes_by_problem, score

    def rollout(solved: bool, sandbox_error: bool = False) -> Trajectory:
        turn = Turn(0, 1, 2, [0.0], "", "print(1)", True, passed_public=solved)
        return Trajectory("p", "python", [1, 2], [turn], solved, sandbox_error=sandbox_error)

    # Public tests passed, then the sandbox failed on the private ones: a failed submission.
    unjudged = rollout(True, sandbox_error=True)
    [outcome] = outcomes_by_problem([unjudged])["p"]
    assert not outcome.correct and outcome.passed_public
    report = score([rollout(True), unjudged, rollout(False)], ["1@1"], max_turns=1)
    assert report.rows[0].mean == pytest.approx(1 / 3)
    assert report.solved_by_turn == [pytest.approx(1 / 3)]
    assert report.sandbox_errors == 1 and report.to_json()["sandbox_errors"] == 1
    assert "sandbox errors: 1 rollouts the sandbox failed to judge, scored as failures" in (
        report.table()
    )
