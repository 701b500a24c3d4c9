"""tools/submit.py and the other commands where there is no Slurm (a laptop, a login node): a
dry run prints the memory plan and every job's script; whatever cannot be done ends in one line
and exit status 2, never a traceback. The submissions themselves are in test_slurm.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import TESTS_DIR, eval_result, run_tool

REPO = TESTS_DIR.parent
CONFIGS = REPO / "configs"


@pytest.fixture
def no_slurm(tmp_path: Path) -> dict[str, str]:
    """An environment whose PATH has no Slurm command (this machine may have them)."""
    path = tmp_path / "bin-without-slurm"
    path.mkdir()
    return {"PATH": str(path)}


def one_error_line(proc, prog: str) -> str:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f"{prog}: error: ") and proc.stderr.count("\n") == 1
    return proc.stderr


def test_dry_run_without_slurm_prints_the_plan_and_every_jobs_script(tmp_path, no_slurm):
    run = tmp_path / "runs" / "70b"
    proc = run_tool(
        "submit.py", CONFIGS / "llama3_70b.yaml", f"run.dir={run}", "--dry-run", env=no_slurm
    )
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    out = proc.stdout
    sections = re.findall(r"^# ==== (\w+(?: [a-z]+)*)", out, re.M)
    assert sections == ["memory plan", "train", "rollout", "eval"], sections
    assert "| **total** |" in out and "\nfits\n" in out
    assert out.count("#!/bin/bash") == 3 and out.count("submitit.core._submit") == 3
    assert "#SBATCH --nodes=128" in out and "#SBATCH --array=0-31%32" in out
    # Evaluated every run.eval_every iterations while training goes on: no afterok.
    assert "--dependency" not in out
    assert "# ==== eval: evaluation (alongside the trainer, following its checkpoints)" in out
    last = out.rstrip().splitlines()[-1]
    assert last.startswith("not checked: sbatch --test-only") and "no Slurm here" in last, last
    # Paths it cannot see from here are warnings, not refusals; nothing is written.
    assert "submit: warning: run.dir=" in proc.stderr
    assert not run.parent.exists()


def test_submit_takes_the_one_node_8b_config(tmp_path, no_slurm):
    """configs/llama3_8b_1node.yaml: the plan of both phases fits; one trainer job of one node,
    8 tasks and 8 GPUs, its tasks not bound to cores (each engine's sandbox runs on its
    group's first rank); no rollout workers."""
    run = tmp_path / "runs" / "8b"
    proc = run_tool(
        "submit.py", CONFIGS / "llama3_8b_1node.yaml", f"run.dir={run}", "--dry-run",
        env=no_slurm,
    )  # fmt: skip
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    out = proc.stdout
    assert re.findall(r"^# ==== (\w+)", out, re.M) == ["memory", "train", "eval", "rollout"]
    assert "| update phase, one GPU | GB |" in out and "| generation phase, one GPU | GB |" in out
    assert "\nfits\n" in out
    train = out.split("# ==== train")[1].split("# ==== eval")[0]
    for directive in ("--nodes=1", "--ntasks-per-node=8", "--gpus-per-node=8", "--requeue"):
        assert f"#SBATCH {directive}\n" in train, train
    assert "--cpu-bind=none" in train
    assert "# ==== rollout: none (colocated" in out


def test_the_eval_job_waits_for_training_unless_it_follows_checkpoints(tmp_path, no_slurm):
    config = (
        CONFIGS / "demo_cpu.yaml",
        f"run.dir={tmp_path / 'run'}",
        "--dry-run",
        "--job",
        "eval",
    )
    colocated = run_tool("submit.py", *config, env=no_slurm)
    assert "#SBATCH --dependency=afterok:TRAIN_JOB_ID" in colocated.stdout, colocated.stderr
    # Disaggregated without run.eval_every: the initial policy and the last checkpoint only,
    # after training.
    after = run_tool("submit.py", *config, "--layout", "disaggregated", env=no_slurm)
    assert "#SBATCH --dependency=afterok:TRAIN_JOB_ID" in after.stdout, after.stderr
    follow = run_tool("submit.py", *config, "--layout", "disaggregated", "run.eval_every=2",
                      "eval.transfer=[/nonexistent/mbpp_plus.jsonl]", env=no_slurm)  # fmt: skip
    assert follow.returncode == 0 and "--dependency" not in follow.stdout, follow.stderr
    assert "submit: warning: eval.transfer: /nonexistent/mbpp_plus.jsonl: no such file" in (
        follow.stderr
    )


def test_dry_run_of_one_job_is_its_script_alone(tmp_path, no_slurm):
    proc = run_tool(
        "submit.py",
        CONFIGS / "llama3_8b.yaml",
        f"run.dir={tmp_path / 'run'}",
        "--dry-run",
        "--job",
        "rollout",
        env=no_slurm,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("#!/bin/bash") and "#SBATCH --array=" in proc.stdout
    assert proc.stdout.count("#!/bin/bash") == 1
    assert "not checked: sbatch --test-only" in proc.stderr
    # A colocated run has no rollout job: one line, not a script.
    proc = run_tool(
        "submit.py",
        CONFIGS / "demo_cpu.yaml",
        f"run.dir={tmp_path / 'run'}",
        "--dry-run",
        "--job",
        "rollout",
        env=no_slurm,
    )
    assert "this config submits only train, eval" in one_error_line(proc, "submit")


def test_dry_run_of_a_cpu_config_says_it_has_no_memory_plan(tmp_path, no_slurm):
    proc = run_tool(
        "submit.py", CONFIGS / "demo_cpu.yaml", f"run.dir={tmp_path / 'run'}", "--dry-run",
        env=no_slurm,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "# ==== memory plan (tools/plan.py)\nnone: a CPU-only job" in proc.stdout
    assert "# ==== rollout: none (colocated" in proc.stdout
    assert proc.stdout.count("#!/bin/bash") == 2


def test_a_submission_without_slurm_is_refused_in_one_line(tmp_path, no_slurm):
    run = tmp_path / "run"
    proc = run_tool("submit.py", CONFIGS / "demo_cpu.yaml", f"run.dir={run}", env=no_slurm)
    line = one_error_line(proc, "submit")
    assert "Slurm is not installed here: no `sbatch`, `srun`, `scontrol` on PATH" in line
    assert proc.stdout == "" and not run.exists()


def test_status_and_cancel_without_slurm_end_in_one_line(tmp_path, no_slurm):
    missing = tmp_path / "missing"
    for command in ("status", "cancel"):
        proc = run_tool("submit.py", command, missing, env=no_slurm)
        assert "no such run directory" in one_error_line(proc, "submit")
    run = tmp_path / "run"
    (run / "slurm").mkdir(parents=True)
    (run / "slurm" / "jobs.json").write_text(json.dumps([{"train": "12", "eval": "13"}]))
    proc = run_tool("submit.py", "cancel", run, env=no_slurm)
    assert "Slurm is not installed here" in one_error_line(proc, "submit")
    proc = run_tool("submit.py", "status", run, env=no_slurm)  # what it knows without Slurm
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("job states unknown: Slurm is not installed here")
    assert "| train | 12 | ? |" in proc.stdout and "checkpoint: none yet" in proc.stdout


def test_status_shows_the_learning_curve_and_the_best_checkpoint(tmp_path, no_slurm):
    from rlef_hpc.eval.evaluator import record

    run = tmp_path / "run"
    (run / "slurm").mkdir(parents=True)
    (run / "slurm" / "jobs.json").write_text(json.dumps([{"train": "12", "eval": "13"}]))
    proc = run_tool("submit.py", "status", run, env=no_slurm)
    assert "evaluations: none yet" in proc.stdout, proc.stderr
    for iteration, valid in ((0, 0.25), (200, 0.5), (400, 0.375)):
        means = {"valid": {"1@3": valid}, "test": {"1@3": valid / 2}}
        record(run, eval_result(iteration, means, bounds=(0.0, 1.0)), "1@3")
    proc = run_tool("submit.py", "status", run, env=no_slurm)
    assert proc.returncode == 0, proc.stderr
    assert "| iteration | valid 1@3 | test 1@3 |" in proc.stdout
    assert "| 200 (best) | 50.0% [0.0, 100.0] | 25.0% [0.0, 100.0] |" in proc.stdout
    assert "best checkpoint on valid 1@3: iteration 200 (valid 1@3 50.0%; test 1@3 25.0%)" in (
        proc.stdout
    )


def test_submit_refuses_job_without_dry_run(tmp_path, no_slurm):
    proc = run_tool(
        "submit.py", CONFIGS / "demo_cpu.yaml", f"run.dir={tmp_path / 'run'}", "--job", "eval",
        env=no_slurm,
    )  # fmt: skip
    assert "--job is for --dry-run" in one_error_line(proc, "submit")


MALFORMED = {
    "a directory": (lambda tmp: tmp, "cannot read this config file (Is a directory)"),
    "missing": (lambda tmp: tmp / "missing.yaml", "no such config file"),
    "not YAML": (lambda tmp: _write(tmp / "c.yaml", "model: [unclosed\n"), "not valid YAML"),
    "not text": (lambda tmp: _write(tmp / "c.yaml", b"\xff\xfe\x00"), "cannot read this config"),
    "a list": (lambda tmp: _write(tmp / "c.yaml", "- a\n"), "expected a mapping"),
    "unknown key": (lambda tmp: _write(tmp / "c.yaml", "nope: 1\n"), "unknown key 'nope'"),
}
COMMANDS = {
    "submit": lambda config, *args: run_tool("submit.py", config, *args, "--dry-run"),
    "plan": lambda config, *args: run_tool("plan.py", config, *args),
    "rlef-train": lambda config, *args: run_module("rlef_hpc.train.cli", config, *args),
    "python -m rlef_hpc.launch.jobs": lambda config, *args: run_module(
        "rlef_hpc.launch.jobs", "eval", config, *args
    ),
}
# Every case through one command (they share config.load), two through each of the others.
BAD_CONFIG_RUNS = [("plan", case) for case in MALFORMED] + [
    (prog, case) for prog in COMMANDS if prog != "plan" for case in ("a directory", "not YAML")
]


def run_module(module: str, *args: object) -> subprocess.CompletedProcess[str]:
    """`python -m MODULE` (what an entry point such as rlef-train runs), from a neutral cwd."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", module, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)


def _write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


@pytest.mark.parametrize(("prog", "case"), BAD_CONFIG_RUNS)
def test_a_bad_config_is_one_line_and_exit_2(tmp_path, prog, case):
    make, message = MALFORMED[case]
    proc = COMMANDS[prog](make(tmp_path))
    assert message in one_error_line(proc, prog)


def test_evaluating_a_run_that_does_not_exist_is_one_line(tmp_path):
    # demo_cpu's run directory (runs/demo_cpu) may exist in a checkout: name one that does not.
    prog = "python -m rlef_hpc.launch.jobs"
    proc = COMMANDS[prog](CONFIGS / "demo_cpu.yaml", f"run.dir={tmp_path / 'missing'}")
    assert "no such run directory" in one_error_line(proc, prog)
