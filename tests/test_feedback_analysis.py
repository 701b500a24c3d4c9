"""The inference-time analysis with scripted answers: feedback modes (real / random / none),
edit statistics between turns, and solve rate against turn and sample budgets."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlef_hpc.data import Problem
from rlef_hpc.data.trajectory import Trajectory, Turn
from rlef_hpc.episodes import (
    EpisodeConfig,
    EpisodeRunner,
    ScriptedPolicy,
    Templates,
    feedback_message,
)
from rlef_hpc.eval.analysis import (
    edit_statistics,
    levenshtein,
    normalised_edit_distance,
    parse_feedback_modes,
    resample_distance,
    sample_curve,
)
from rlef_hpc.eval.metrics import RolloutOutcome
from rlef_hpc.eval.report import outcomes_by_problem, score
from rlef_hpc.models.tokenizer import build_tokenizer
from rlef_hpc.sandbox import TestCase
from tests.helpers import run_tool


def add(k: int) -> Problem:
    """'print x + k', with public and private inputs of its own (k01, k02, k50, k60)."""
    inputs = [100 * k + 1, 100 * k + 2, 100 * k + 50, 100 * k + 60]
    tests = [TestCase(f"{x}\n", f"{x + k}\n") for x in inputs]
    return Problem(
        name=f"add{k}",
        description=f"Read an integer x and print x + {k}",
        public_tests=tests[:2],
        private_tests=tests[2:],
        time_limit_s=2.0,
        memory_limit_bytes=256 << 20,
    )


def fenced(code: str) -> str:
    return f"```python\n{code}```"


WRONG = fenced("print(int(input()))\n")  # fails the public tests of every add(k), k > 0
NO_CODE = "no idea"


def right(k: int) -> str:
    return fenced(f"print(int(input()) + {k})\n")


def hardcoded(k: int) -> str:
    """Passes the public tests of add(k), fails the private ones."""
    return fenced(
        f"print({{{100 * k + 1}: {101 * k + 1}, {100 * k + 2}: {101 * k + 2}}}[int(input())])\n"
    )


A, B = add(1), add(2)
SCRIPTS = {
    A.name: [[right(1)], [WRONG, right(1)], [WRONG, WRONG, right(1)], [hardcoded(1)]],
    B.name: [[WRONG, WRONG, WRONG], [hardcoded(2)], [WRONG, right(2)], [NO_CODE] * 2 + [right(2)]],
}


@pytest.fixture(scope="module")
def tokenizer():
    corpus = [p.description for p in (A, B)] + [WRONG, right(1), Templates().initial]
    return build_tokenizer(corpus * 20, vocab_size=400)


def episodes(tokenizer, executor, problems, scripts, **config) -> list[Trajectory]:
    policy = ScriptedPolicy(tokenizer, problems, scripts)
    runner = EpisodeRunner(tokenizer, executor, policy, EpisodeConfig(**config))
    return runner.run([p for p in problems for _ in scripts[p.name]])


# --- feedback at inference ---------------------------------------------------------------------


@pytest.mark.parametrize("deterministic", [True, False])
def test_random_feedback_is_never_the_problems_own(tokenizer, executor, deterministic):
    problems = [add(k) for k in range(1, 5)]
    scripts = {p.name: [[WRONG] * 3] * 3 for p in problems}  # every turn fails: 2 messages each
    real = episodes(tokenizer, executor, problems, scripts, max_turns=3)
    own = {t.problem: t.turns[0].feedback for t in real}
    assert len(set(own.values())) == 4  # each problem's real feedback quotes its own inputs
    withheld = feedback_message(Templates(), "python", [])
    shown = episodes(
        tokenizer,
        executor,
        problems,
        scripts,
        max_turns=3,
        feedback="random",
        deterministic=deterministic,
    )
    messages = [(t.problem, turn.feedback) for t in shown for turn in t.turns[:-1]]
    assert len(messages) == 4 * 3 * 2
    for problem, message in messages:
        assert message != own[problem]
        assert message == withheld or message in own.values()
        p = next(x for x in problems if x.name == problem)
        assert all(f"input '{c.input.strip()}'" not in message for c in p.public_tests)
    # Another problem's feedback is what most turns see (only the first ones, before any other
    # problem has failed, see the withheld message).
    assert sum(m != withheld for _, m in messages) >= len(messages) // 2


def test_no_feedback_withholds_the_failing_tests(tokenizer, executor):
    [t] = episodes(tokenizer, executor, [A], {A.name: [[WRONG, right(1)]]}, feedback="none")
    assert t.success and t.turns[0].feedback == (
        "Your code failed the following tests:\nGive it another try.\nYour code should be "
        "enclosed in triple backticks like so: ```python YOUR CODE HERE ```. Use the backticks "
        "for your code only."
    )


def test_feedback_modes_parse():
    assert parse_feedback_modes("real, none") == ["real", "none"]
    for bad in ("real,real", "true", ""):
        with pytest.raises(ValueError):
            parse_feedback_modes(bad)


def test_the_evaluation_jobs_feedback_modes_are_configured():
    from rlef_hpc.config import ConfigError, load
    from rlef_hpc.train.config import TrainConfig

    assert load(TrainConfig).eval.feedback == ("real",)
    cfg = load(TrainConfig, None, ["eval.feedback=[real,random,none]"])
    assert cfg.eval.feedback == ("real", "random", "none")
    for bad, message in (("[real,real]", "distinct"), ("[fake]", "'fake' is not one of")):
        with pytest.raises(ConfigError, match=message):
            load(TrainConfig, None, [f"eval.feedback={bad}"])


# --- edit statistics ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "distance", "normalised"),
    [
        ("kitten", "sitting", 3, 3 / 7),  # k->s, e->i, +g
        ("flaw", "lawn", 2, 2 / 4),  # -f, +n
        ("abc", "abc", 0, 0.0),
        ("", "abc", 3, 1.0),
        ("abc", "xyz", 3, 1.0),
        ("print(a - b)\n", "print(a + b)\n", 1, 1 / 13),
        ("x = 1\nprint(x)\n", "print(1)\n", 7, 7 / 15),  # -"x = 1\n", then x->1
    ],
)
def test_edit_distance_by_hand(a, b, distance, normalised):
    assert levenshtein(a, b) == levenshtein(b, a) == distance
    assert normalised_edit_distance(a, b) == pytest.approx(normalised)


def test_edit_distance_of_missing_code_and_tokens():
    assert normalised_edit_distance(None, None) == 0.0
    assert normalised_edit_distance(None, "print(1)\n") == 1.0
    assert levenshtein(["a = 1", "print(a)"], ["print(a)"]) == 1  # any sequence: lines here


def turn(code: str | None, passed: bool) -> Turn:
    return Turn(0, 0, 0, [], "", code, code is not None, passed_public=passed)


def test_edit_statistics_of_hand_made_trajectories():
    def episode(problem: str, *turns: Turn) -> Trajectory:
        return Trajectory(problem, "python", [], list(turns), success=turns[-1].passed_public)

    trajectories = [
        episode("p", turn("print(1)\n", False), turn("print(2)\n", True)),
        episode("p", turn("x", False), turn("x", False), turn("xy", False)),
        episode("q", turn(None, False)),
        episode("q", turn("abcd", True)),
    ]
    first, second = edit_statistics(trajectories, max_turns=3)
    # 1->2: two pairs; one changed ("1" -> "2": 1 of 9 characters) and fixed, one unchanged
    assert (first.turn, first.pairs, first.changed, first.fixed) == (1, 2, 0.5, 0.5)
    assert first.distance == pytest.approx((1 / 9 + 0) / 2)
    # 2->3: one pair, "x" -> "xy" (one insertion, over 2 characters), still failing
    assert (second.turn, second.pairs, second.changed, second.distance, second.fixed) == (
        2,
        1,
        1.0,
        0.5,
        0.0,
    )
    # first answers of rollouts 1 and 2 of each problem: "print(1)\n" vs "x" (9 edits of 9),
    # no code vs "abcd" (1.0)
    assert resample_distance(trajectories) == pytest.approx(1.0)


def test_edit_statistics_of_scripted_episodes(tokenizer, executor):
    report = score(episodes(tokenizer, executor, [A, B], SCRIPTS, max_turns=3), ["1@3"])
    one, two = report.edits
    # 1->2: add1 W->R, W->W; add2 W->W, W->R, none->none. W -> R inserts " + k" (4 of the 24
    # characters of "print(int(input()) + k)\n").
    assert (one.pairs, one.changed, one.fixed) == (5, 2 / 5, 2 / 5)
    assert one.distance == pytest.approx(2 * (4 / 24) / 5)
    # 2->3: add1 W->R; add2 W->W, none->R (everything new: 1.0)
    assert (two.pairs, two.changed, two.fixed) == (3, 2 / 3, 2 / 3)
    assert two.distance == pytest.approx((4 / 24 + 0 + 1) / 3)


# --- budgets -----------------------------------------------------------------------------------


def brute_force_n_at_k(outcomes: list[RolloutOutcome], n: int, k: int, turns: int) -> float:
    """n@k by enumeration: every set of k // turns rollouts, every choice of (up to) n of their
    public-passing answers to submit, equally likely."""
    solved, draws = [], list(itertools.combinations(outcomes, k // turns))
    for drawn in draws:
        public = [o for o in drawn if o.passed_public]
        if not public:
            solved.append(0.0)
            continue
        picks = list(itertools.combinations(public, min(n, len(public))))
        solved.append(sum(any(o.correct for o in pick) for pick in picks) / len(picks))
    return sum(solved) / len(draws)


def test_budget_curves_equal_n_at_k_computed_directly(tokenizer, executor):
    trajectories = episodes(tokenizer, executor, [A, B], SCRIPTS, max_turns=3)
    report = score(trajectories, ["1@3", "1@6", "1@12", "10@12"], max_turns=3)
    grouped = outcomes_by_problem(trajectories)
    for n in (1, 10):
        curve = sample_curve(grouped, n, 3)
        assert (
            [k for k, _ in curve] == [3, 6, 9, 12] == [k for k, _ in report.sample_curves[str(n)]]
        )
        for k, rate in curve:
            direct = [brute_force_n_at_k(o, n, k, 3) for o in grouped.values()]
            assert rate == pytest.approx(sum(direct) / len(direct))
    rows = {r.name: r.mean for r in report.rows}
    curve = dict(report.sample_curves["1"])
    assert rows["1@3"] == pytest.approx(curve[3]) and rows["1@12"] == pytest.approx(curve[12])
    assert rows["10@12"] == pytest.approx(dict(report.sample_curves["10"])[12])
    # Against turns: the curve at t is what episodes cut at t turns solve, run directly.
    assert report.solved_by_turn == pytest.approx([1 / 8, 3 / 8, 5 / 8])
    for t in (1, 2):
        cut = episodes(tokenizer, executor, [A, B], SCRIPTS, max_turns=t)
        assert sum(e.success for e in cut) / len(cut) == pytest.approx(report.solved_by_turn[t - 1])


def test_more_turns_than_three(tokenizer, executor):
    scripts = {A.name: [[WRONG] * 4 + [right(1)], [WRONG] * 5]}
    # Deterministic batches: the scripted policy tells these rollouts apart only by the order
    # in which their (identical) turns ask.
    trajectories = episodes(tokenizer, executor, [A], scripts, max_turns=5, deterministic=True)
    report = score(trajectories, ["1@3", "1@5"], 5)
    assert report.skipped == ["1@3 buys less than one 5-turn rollout"]
    assert [r.name for r in report.rows] == ["1@5"] and report.rows[0].mean == 0.5
    assert report.solved_by_turn == [0, 0, 0, 0, 0.5]
    assert [e.turn for e in report.edits] == [1, 2, 3, 4] and report.edits[3].fixed == 0.5


# --- rlef-eval and the comparison tool ---------------------------------------------------------


def write_answers(path: Path, problems: list[Problem], scripts) -> Path:
    lines = [{"problem": p.name, "turns": r} for p in problems for r in scripts[p.name]]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


@pytest.fixture
def problem_file(tmp_path: Path) -> Path:
    from rlef_hpc.train.problems import write_problems

    path = tmp_path / "problems.jsonl"
    write_problems([A, B], path)
    return path


def test_rlef_eval_reports_each_feedback_mode(tmp_path, problem_file):
    answers = write_answers(tmp_path / "answers.jsonl", [A, B], SCRIPTS)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "rlef_hpc.eval.cli", "--problems", str(problem_file)]
        + ["--answers", str(answers), "--feedback", "real,random,none", "--metrics", "1@3"]
        + ["--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert (
        "## random feedback" in proc.stdout
        and "| 1->2 | 5 | 40.0% | 0.067 | 40.0% |" in proc.stdout
    )
    reports = {
        m: json.loads((out / m / "report.json").read_text()) for m in ("real", "random", "none")
    }
    assert [r["feedback"] for r in reports.values()] == ["real", "random", "none"]
    # Replayed answers do not read the feedback: the same outcomes in every mode.
    assert len({json.dumps(r["rows"]) + json.dumps(r["edits"]) for r in reports.values()}) == 1
    for line in (out / "random" / "trajectories.jsonl").read_text().splitlines():
        t = json.loads(line)
        own = {"add1": "'101'", "add2": "'201'"}[t["problem"]]
        assert all(own not in (turn["feedback"] or "") for turn in t["turns"])


def test_feedback_analysis_compares_two_policies(tmp_path, problem_file):
    before = write_answers(
        tmp_path / "before.jsonl", [A, B], {A.name: [[WRONG] * 3] * 2, B.name: [[WRONG] * 3] * 2}
    )
    after = write_answers(
        tmp_path / "after.jsonl",
        [A, B],
        {A.name: [[right(1)], [WRONG, right(1)]], B.name: [[WRONG] * 3, [WRONG, right(2)]]},
    )
    out = tmp_path / "analysis"
    proc = run_tool(
        "feedback_analysis.py",
        before,
        after,
        "--out",
        out,
        "--problems",
        problem_file,
        "--metrics",
        "1@3",
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    table = (out / "analysis.md").read_text()
    # before: nothing solved; after: 3 of 4 rollouts (1@3 = 75%, a gain of 75 points)
    assert "| real | 0.0% [0.0, 0.0] | 75.0% " in table and "+75.0 points" in table
    assert "before: 0.0% / 0.0% / 0.0%, after: 25.0% / 75.0% / 75.0% |" in table
    assert "| after | random | 1->2 | 3 | 66.7% |" in table
    assert "| 2 | 0.0% | 75.0% |" in table  # solved by turn 2, real feedback
    assert (out / "budgets.png").read_bytes()[:4] == b"\x89PNG"
    assert len(json.loads((out / "analysis.json").read_text())) == 6


def test_an_unknown_feedback_mode_is_one_line(tmp_path, problem_file):
    answers = write_answers(tmp_path / "answers.jsonl", [A], {A.name: [[right(1)]]})
    proc = subprocess.run(
        [sys.executable, "-m", "rlef_hpc.eval.cli", "--problems", str(problem_file)]
        + ["--answers", str(answers), "--feedback", "real,fake"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        proc.returncode == 2 and "feedback 'fake' is not one of real, random, none" in proc.stderr
    )
    assert "Traceback" not in proc.stderr
