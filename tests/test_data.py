"""Problem data: the CodeContests loader on a fixture written for these tests, its errors on
malformed records, parquet, splits, and the bundled problem set judged in the sandbox."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from rlef_hpc.data import (
    LoadStats,
    ProblemFormatError,
    iter_problems,
    load_problems,
    problem_record,
)
from rlef_hpc.data.bundled import BUNDLED, build, load_bundled
from rlef_hpc.sandbox import Executor, Job

FIXTURE = Path(__file__).parent / "data" / "codecontests_tiny.jsonl"


def test_fixture_loads_and_drops_problems_without_tests(caplog):
    stats = LoadStats()
    with caplog.at_level("INFO"):
        problems = list(iter_problems(FIXTURE, stats=stats))
    assert [p.name for p in problems] == ["1000_A. Two Sums", "1000_C. Echo"]
    assert stats.loaded == 2 and stats.dropped_without_tests == ["1000_B. No Tests"]
    assert "dropped 1 problems without tests" in caplog.text
    # Private tests only: no feedback could ever be given, and the empty public tests would
    # "pass" every first answer.
    assert stats.dropped_without_public_tests == ["1000_D. Hidden Tests Only"]
    assert "dropped 1 problems without public tests" in caplog.text
    first = problems[0]
    assert first.time_limit_s == pytest.approx(2.5) and first.memory_limit_bytes == 256 << 20
    assert first.limits().time_s == 2.5 and first.limits().memory_mb == 256
    assert [t.input for t in first.private_tests] == ["5 6\n", "0 0\n"]
    assert len(first.generated_tests) == 1 and first.judge_tests[0].output == "3\n"
    assert [s.language for s in first.solutions] == ["python", "cpp"]
    assert first.incorrect_solutions[0].source == "print(0)\n"
    assert problems[1].solutions[0].language == "python2" and problems[1].memory_limit_bytes is None
    assert first.tags == ("math",) and first.source == f"{FIXTURE}:1"


def test_records_round_trip():
    for problem in load_problems(FIXTURE):
        record = json.loads(json.dumps(problem_record(problem)))
        from rlef_hpc.data import parse_problem

        again = parse_problem(record, problem.source)
        assert again == problem


def test_parquet_and_splits(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "valid-00000-of-00001.parquet")
    shutil.copy(FIXTURE, tmp_path / "train.jsonl")
    valid = load_problems(tmp_path, split="valid")
    assert [p.name for p in valid] == ["1000_A. Two Sums", "1000_C. Echo"]
    assert valid[0].source.endswith("valid-00000-of-00001.parquet: row 1")
    assert valid[0].time_limit_s == pytest.approx(2.5)
    assert len(load_problems(tmp_path, split="train")) == 2
    with pytest.raises(FileNotFoundError, match="no test problem files"):
        load_problems(tmp_path, split="test")
    with pytest.raises(ValueError, match="unknown split 'dev'; expected one of train, valid, test"):
        load_problems(tmp_path, split="dev")


def _broken(tmp_path, change) -> Path:
    records = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    change(records[2])
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.pop("description"), "broken.jsonl:3: missing field 'description'"),
        (lambda r: r.update(name=7), "broken.jsonl:3: field 'name': expected str, got int"),
        (
            lambda r: r["public_tests"].update(output=[1]),
            "broken.jsonl:3: field 'public_tests.output': expected a list of strings",
        ),
        (
            lambda r: r["private_tests"].update(output=[]),
            "broken.jsonl:3: field 'private_tests': 1 inputs but 0 outputs",
        ),
        (
            lambda r: r["solutions"].update(language=[9]),
            "broken.jsonl:3: field 'solutions.language': unknown language 9",
        ),
        (
            lambda r: r.update(time_limit={"seconds": "2"}),
            "broken.jsonl:3: field 'time_limit': field 'seconds': expected int, got str",
        ),
        (
            lambda r: r.update(memory_limit_bytes=True),
            "broken.jsonl:3: field 'memory_limit_bytes': expected int, got bool",
        ),
    ],
)
def test_malformed_records_name_file_line_and_field(tmp_path, change, message):
    with pytest.raises(ProblemFormatError) as err:
        load_problems(_broken(tmp_path, change))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_broken_json_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(FIXTURE.read_text().splitlines()[0] + "\n{not json\n")
    with pytest.raises(ProblemFormatError, match=r"bad.jsonl:2: not valid JSON"):
        load_problems(path)
    with pytest.raises(FileNotFoundError, match="no problem file or directory"):
        load_problems(tmp_path / "missing.jsonl")


def test_bundled_file_is_what_build_makes():
    problems = load_bundled()
    assert len(problems) >= 40
    assert len({p.name for p in problems}) == len(problems)
    for problem in problems:
        assert len(problem.public_tests) >= 2 and len(problem.private_tests) >= 8
        assert problem.reference() is not None and problem.incorrect_solutions
    rebuilt = [json.dumps(problem_record(p)) for p in build()]
    assert BUNDLED.read_text().splitlines() == rebuilt  # deterministic, and up to date


def test_every_bundled_reference_passes_and_every_wrong_solution_fails(executor: Executor):
    problems = load_bundled()
    jobs = [Job.build("python", p.reference().source, p.judge_tests, p.limits()) for p in problems]
    jobs += [
        Job.build("python", p.incorrect_solutions[0].source, p.judge_tests, p.limits())
        for p in problems
    ]
    results = executor.run_many(jobs)
    for problem, verdicts in zip(problems, results[: len(problems)], strict=True):
        assert all(r.passed for r in verdicts), (problem.name, [r.verdict for r in verdicts])
    for problem, verdicts in zip(problems, results[len(problems) :], strict=True):
        assert not all(r.passed for r in verdicts), f"the wrong solution of {problem.name} passes"


def test_synthetic_problems_are_seeded_split_and_solved_by_their_references(executor: Executor):
    from rlef_hpc.data import synthetic

    train = synthetic.generate(40, "train", seed=3)
    heldout = synthetic.generate(15, "heldout", seed=3)
    assert [p.name for p in train] == [p.name for p in synthetic.generate(40, "train", seed=3)]
    assert not {p.name for p in train} & {p.name for p in heldout}
    assert {p.tags[1] for p in train} == set(synthetic.CURRICULA["basic"])
    for p in train + heldout:
        assert len(p.public_tests) == 2 and len(p.private_tests) == 8
    jobs = [
        Job.build("python", p.reference().source, p.judge_tests, p.limits())
        for p in train + heldout
    ]
    for problem, verdicts in zip(train + heldout, executor.run_many(jobs), strict=True):
        assert all(r.passed for r in verdicts), (problem.name, [r.stderr for r in verdicts])
    with pytest.raises(ValueError, match="unknown split 'valid'; expected one of train, heldout"):
        synthetic.generate(1, "valid")
    with pytest.raises(ValueError, match="cannot draw 10000 distinct heldout problems"):
        synthetic.generate(10000, "heldout")
    with pytest.raises(ValueError, match="unknown curriculum 'hard'; expected one of basic, feed"):
        synthetic.generate(1, curriculum="hard")


def test_the_feedback_curriculum_adds_problems_only_feedback_solves(executor: Executor):
    from rlef_hpc.data import synthetic

    basic = synthetic.generate(60, "train", seed=0)
    both = synthetic.generate(60, "train", seed=0, curriculum="feedback")
    assert "secret" not in {p.tags[1] for p in basic}
    secret = [p for p in both if p.tags[1] == "secret"]
    assert len(secret) >= len(both) // 5  # a family of ten, not yet the others exhausted
    for problem in secret:
        letter = problem.private_tests[0].output.strip()
        assert f"'{letter}'" in problem.reference().source and letter not in problem.description
    # The statement does not tell: one program cannot pass two puzzles with different letters.
    a = secret[0]
    b = next(p for p in secret if p.private_tests[0].output != a.private_tests[0].output)
    jobs = [Job.build("python", a.reference().source, p.judge_tests, p.limits()) for p in (a, b)]
    passed = [all(r.passed for r in rs) for rs in executor.run_many(jobs)]
    assert passed == [True, False]


def test_a_runs_problems_are_drawn_by_data_seed_not_by_run_seed():
    """Runs of different seeds (the demo's seed table) train and are measured on the same
    problems and tests: only their training's randomness differs."""
    from rlef_hpc.config import load
    from rlef_hpc.train.config import TrainConfig
    from rlef_hpc.train.problems import load_problems, load_test_problems

    def problems(*overrides: str) -> list[tuple]:
        cfg = load(TrainConfig, None, list(overrides))
        train, valid = load_problems(cfg)
        return [
            (p.name, [(t.input, t.output) for t in p.public_tests + p.private_tests])
            for p in train + valid + load_test_problems(cfg)
        ]

    assert problems("run.seed=0") == problems("run.seed=3")
    assert problems("run.seed=0") != problems("data.seed=1")
