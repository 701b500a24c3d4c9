"""rlef-sandbox, run as users run it: the installed console script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import require

A_PLUS_B = "a, b = map(int, input().split())\nprint(a + b)\n"


@pytest.fixture(scope="module")
def cli() -> str:
    beside = Path(sys.executable).parent / "rlef-sandbox"  # the venv's, even if not on PATH
    path = str(beside) if beside.exists() else shutil.which("rlef-sandbox")
    require(path is not None, "rlef-sandbox is not installed (pip install -e .)")
    return path


def run(cli: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([cli, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "sol.py").write_text(A_PLUS_B)
    (tmp_path / "tests.jsonl").write_text(
        '{"input": "1 2\\n", "output": "3\\n"}\n\n{"input": "5 5\\n", "output": "10\\n"}\n'
    )
    (tmp_path / "wrong.jsonl").write_text('{"input": "1 2\\n", "output": "4\\n"}\n' * 3)
    return {p.stem: p for p in tmp_path.iterdir()}


def test_all_pass_exits_0_with_one_json_line_per_test(cli, files):
    proc = run(
        cli, "--lang", "python", "--source", str(files["sol"]), "--tests", str(files["tests"])
    )
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["test"], r["verdict"], r["output"]) for r in lines] == [
        (0, "OK", "3\n"),
        (1, "OK", "10\n"),
    ]
    assert {"time_s", "memory_kb", "stderr", "exit_code"} <= set(lines[0])


def test_failure_exits_1_and_stops_when_asked(cli, files):
    args = ["--lang", "python", "--source", str(files["sol"]), "--tests", str(files["wrong"])]
    proc = run(cli, *args)
    assert proc.returncode == 1 and len(proc.stdout.splitlines()) == 3
    proc = run(cli, *args, "--stop-on-first-failure", "--time-limit", "2", "--memory-limit", "128")
    assert proc.returncode == 1
    assert [json.loads(line)["verdict"] for line in proc.stdout.splitlines()] == ["WRONG_ANSWER"]


def test_cpp(cli, files, tmp_path):
    src = tmp_path / "sol.cpp"
    src.write_text(
        "#include <iostream>\nint main(){long a,b;std::cin>>a>>b;std::cout<<a+b<<'\\n';}\n"
    )
    proc = run(cli, "--lang", "cpp", "--source", str(src), "--tests", str(files["tests"]))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lang", "rust"], "argument --lang: invalid choice: 'rust'"),
        (["--source", "{missing}"], "cannot read source"),
        (["--tests", "{bad_json}"], "bad.jsonl:2: not valid JSON"),
        (["--tests", "{no_input}"], "no_input.jsonl:1: missing field 'input'"),
        (["--tests", "{empty}"], "empty.jsonl: no tests"),
        (["--time-limit", "-1"], "argument --time-limit: must be positive, got -1"),
        (["--memory-limit", "lots"], "argument --memory-limit: expected a number, got 'lots'"),
    ],
)
def test_bad_usage_exits_2_with_one_clear_line(cli, files, tmp_path, args, message):
    (tmp_path / "bad.jsonl").write_text('{"input": "1", "output": "1"}\n{"input": \n')
    (tmp_path / "no_input.jsonl").write_text('{"output": "1"}\n')
    (tmp_path / "empty.jsonl").write_text("\n")
    paths = {
        "missing": tmp_path / "nope.py",
        "bad_json": tmp_path / "bad.jsonl",
        "no_input": tmp_path / "no_input.jsonl",
        "empty": tmp_path / "empty.jsonl",
    }
    base = {"--lang": "python", "--source": str(files["sol"]), "--tests": str(files["tests"])}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value.format(**paths)
    proc = run(cli, *[x for kv in base.items() for x in kv])
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("rlef-sandbox: error:")
