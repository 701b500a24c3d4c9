"""rlef-eval as users run it: replaying answers, and generating with vLLM from an HF model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlef_hpc.data.bundled import load_bundled
from tests.helpers import require, save_random_llama

CLI = [sys.executable, "-m", "rlef_hpc.eval.cli"]


def fenced(code: str) -> str:
    return f"```python\n{code}```"


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def test_answers_file_gives_the_table_plot_and_report(tmp_path: Path) -> None:
    problems = load_bundled()[:4]
    right = [fenced(p.reference().source) for p in problems]
    wrong = [fenced("print('not the answer')\n") for p in problems]  # fails public tests too
    lines = []
    for i, p in enumerate(problems):
        lines.append({"problem": p.name, "turns": [right[i]]})  # solved at turn 1
        lines.append({"problem": p.name, "turns": [wrong[i], right[i]]})  # solved at turn 2
        lines.append({"problem": p.name, "turns": ["no idea"] * 3})  # never
    answers = tmp_path / "answers.jsonl"
    answers.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "out"
    proc = run(
        "--answers", str(answers), "--limit", "4", "--metrics", "1@3,1@6,2@9", "--out", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    assert "| 1@3 | 66.7% |" in proc.stdout  # 2 of 3 rollouts of every problem succeed
    assert "| 1@6 |" in proc.stdout and "| 2@9 | 100.0% |" in proc.stdout
    assert "turn 1: 33.3%, turn 2: 66.7%, turn 3: 66.7%" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["problems"] == 4 and report["rollouts_per_problem"] == 3
    assert (out / "solve_rate.png").read_bytes()[:4] == b"\x89PNG"
    trajectories = [json.loads(x) for x in (out / "trajectories.jsonl").read_text().splitlines()]
    assert len(trajectories) == 12 and sum(t["success"] for t in trajectories) == 8


def test_metrics_the_rollouts_cannot_support_are_named(tmp_path: Path) -> None:
    p = load_bundled()[0]
    answers = tmp_path / "a.jsonl"
    answers.write_text(
        json.dumps({"problem": p.name, "turns": [fenced(p.reference().source)]}) + "\n"
    )
    proc = run("--answers", str(answers), "--limit", "1")
    assert proc.returncode == 0, proc.stderr
    assert "| 1@3 | 100.0% |" in proc.stdout
    assert "not estimated: 10@100 needs 33 rollouts per problem; have 1" in proc.stdout


@pytest.mark.parametrize(
    ("content", "args", "message"),
    [
        ('{"problem": "nope", "turns": ["x"]}', [], "a.jsonl:1: unknown problem 'nope'"),
        ('{"problem": "sum-of-two", "turns": []}', [], "a.jsonl:1: field 'turns' must be"),
        ("{bad", [], "a.jsonl:1: not valid JSON"),
        (
            '{"problem": "sum-of-two", "turns": ["x"]}',
            ["--metrics", "pass@1"],
            "not of the form n@k",
        ),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, content, args, message):
    answers = tmp_path / "a.jsonl"
    answers.write_text(content + "\n")
    proc = run("--answers", str(answers), *args)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
        import vllm  # noqa: F401
    except ImportError as e:
        require(False, f"vLLM / torch not installed ({e}): pip install -e '.[cpu]'")
    from rlef_hpc.models.tokenizer import build_tokenizer

    path = tmp_path_factory.mktemp("tiny-llama")
    problems = load_bundled()
    tokenizer = build_tokenizer(
        [p.description for p in problems] + [fenced(p.reference().source) for p in problems]
    )
    return save_random_llama(
        path, tokenizer, max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id
    )


@pytest.mark.multiprocess
def test_model_directory_is_evaluated_with_vllm(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run(
        "--model",
        str(tiny_model),
        "--limit",
        "2",
        "--rollouts",
        "2",
        "--max-tokens",
        "24",
        "--temperature",
        "1.0",
        "--metrics",
        "1@3,1@6",
        "--out",
        str(out),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| 1@3 |" in proc.stdout and "| 1@6 |" in proc.stdout
    # vLLM's engine logs and the libraries' warnings in the log file, not on the terminal
    assert "INFO" not in proc.stderr + proc.stdout and "Warning" not in proc.stderr
    assert "vllm" in (out / "logs" / "eval.log").read_text()
    trajectories = [json.loads(x) for x in (out / "trajectories.jsonl").read_text().splitlines()]
    assert len(trajectories) == 4
    for t in trajectories:
        for turn in t["turns"]:
            n = turn["response_end"] - turn["prompt_end"]
            assert 0 < n <= 24 and len(turn["behaviour_logprobs"]) == n
            assert all(lp <= 0 for lp in turn["behaviour_logprobs"])
    # A random model: two samples of the same problem differ (no per-request seed).
    assert trajectories[0]["tokens"] != trajectories[1]["tokens"]


def test_function_problems_for_the_transfer_evaluation(tmp_path: Path) -> None:
    fixture = Path(__file__).parent / "data" / "functions_tiny.jsonl"
    lines = [
        {"problem": "Tiny/0", "turns": [fenced("def add(a, b):\n    return a + b\n")]},
        {"problem": "Tiny/1", "turns": [fenced("def evens(xs):\n    return [], set()\n")] * 3},
        {"problem": "Tiny/2", "turns": [fenced("def shout(s):\n    return s.upper() + '!'\n")]},
    ]
    answers = tmp_path / "answers.jsonl"
    answers.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    proc = run("--problems", str(fixture), "--answers", str(answers), "--metrics", "1@3")
    assert proc.returncode == 0, proc.stderr
    assert "| 1@3 | 66.7% |" in proc.stdout  # add and shout solved, evens never


def test_a_model_that_is_not_there_is_one_line_before_anything_starts(tmp_path):
    for model, message in (
        (tmp_path / "missing", "no such model directory"),
        (tmp_path, "not a Hugging Face model (no config.json)"),
    ):
        proc = run("--model", str(model), "--limit", "1")
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
