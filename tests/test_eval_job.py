"""The evaluation job (rlef_hpc.launch.jobs.evaluate_run) without vLLM: a fake engine, fake
exports, checkpoints that appear while it evaluates. Each due checkpoint is evaluated exactly
once, in order, also across a requeue; the best on valid is moved to best/; the other exports
are deleted."""

from __future__ import annotations

import json

import pytest

from rlef_hpc.checkpoint import training
from rlef_hpc.config import load
from rlef_hpc.data import synthetic
from rlef_hpc.eval import policy, protocol
from rlef_hpc.launch import jobs
from rlef_hpc.launch.config import JobConfig
from rlef_hpc.train.problems import write_problems
from tests.helpers import TESTS_DIR, run_script, script, trajectory

CONFIGS = TESTS_DIR.parent / "configs"
SKILL = {0: 0.0, 2: 0.5, 4: 1.0, 6: 0.5, 7: 0.5}  # the share of problems each policy solves


class Killed(Exception):
    pass


class FakeTrainer:
    """Writes checkpoint `iteration` (a complete one on disk) when asked."""

    def __init__(self, run):
        self.run = run

    def save(self, iteration):
        path = self.run / training.checkpoint_name(iteration)
        path.mkdir()
        (path / training.STATE).write_text("state")
        (self.run / "latest").write_text(f"{iteration}\n")


@pytest.fixture
def run(tmp_path, monkeypatch):
    """A run of 7 iterations, eval_every=2; its trainer saves the next checkpoint each time
    the evaluation job loads a model (training goes on while it evaluates)."""
    run = tmp_path / "run"
    (run / "init").mkdir(parents=True)
    (run / "init" / "config.json").write_text("{}")
    problems = synthetic.generate(4, "heldout", 0)
    write_problems(problems[:2], run / "problems" / "eval.jsonl")
    write_problems(problems[2:], run / "problems" / "test.jsonl")
    trainer = FakeTrainer(run)
    state = {"next": 1, "loaded": [], "kill_after": None}

    def export_hf(checkpoint, out):
        out.mkdir(parents=True)
        (out / "config.json").write_text(json.dumps({"from": checkpoint.name}))

    class Evaluator:
        def __init__(self, rollout, episodes, executor, seed):
            self.skill = None

        def load(self, model_dir):
            name = json.loads((model_dir / "config.json").read_text()).get("from", "init")
            state["loaded"].append(name)
            if state["kill_after"] is not None and len(state["loaded"]) > state["kill_after"]:
                raise Killed  # the job killed (requeued) in the middle of an evaluation
            self.skill = SKILL[0 if name == "init" else int(name[len("iter_") :])]
            for _ in range(2):  # training runs on meanwhile
                if state["next"] <= 7:
                    trainer.save(state["next"])
                    state["next"] += 1

        def generate(self, problems, temperature, top_p, key):
            names = list(dict.fromkeys(p.name for p in problems))
            solved = set(names[: round(len(names) * self.skill)])
            return [trajectory(p.name, p.name in solved, 1) for p in problems]

    monkeypatch.setattr(policy, "ModelEvaluator", Evaluator)
    monkeypatch.setattr("rlef_hpc.checkpoint.convert.export_hf", export_hf)
    cfg = load(JobConfig, CONFIGS / "demo_cpu.yaml", [
        f"run.dir={run}", "run.iterations=7", "run.eval_every=2", "eval.rollouts_per_problem=1",
        "eval.metrics=[{name: 1@3}]", "rollout.layout=disaggregated", "rollout.sandbox_workers=1",
    ])  # fmt: skip
    return run, cfg, state


def test_follows_checkpoints_and_evaluates_each_due_one_once(run):
    run, cfg, state = run
    best = jobs.evaluate_run(cfg, follow=True, poll_s=0.01)
    # 0, every second iteration, and the last (7), in order, each loaded once.
    assert [r["iteration"] for r in protocol.read_results(run)] == [0, 2, 4, 6, 7]
    assert state["loaded"] == ["init", "iter_0000002", "iter_0000004", "iter_0000006",
                               "iter_0000007"]  # fmt: skip
    assert best["iteration"] == 4 and best["sets"]["test"]["metrics"]["1@3"]["mean"] == 1.0
    assert json.loads((run / "best" / "selected.json").read_text())["iteration"] == 4
    assert json.loads((run / "best" / "config.json").read_text())["from"] == "iter_0000004"
    assert not list((run / "export").iterdir())  # the rest deleted once evaluated
    assert "| 4 (best) |" in (run / "eval" / "curve.md").read_text()


def test_a_requeue_neither_repeats_nor_skips_an_evaluation(run):
    run, cfg, state = run
    state["kill_after"] = 2  # killed while loading the third model (iteration 4)
    with pytest.raises(Killed):
        jobs.evaluate_run(cfg, follow=True, poll_s=0.01)
    assert [r["iteration"] for r in protocol.read_results(run)] == [0, 2]
    state["kill_after"] = None
    jobs.evaluate_run(cfg, follow=True, poll_s=0.01)  # the requeued job
    assert [r["iteration"] for r in protocol.read_results(run)] == [0, 2, 4, 6, 7]
    assert state["loaded"][3:] == ["iter_0000004", "iter_0000006", "iter_0000007"]
    # Run again after training: nothing left to do, nothing redone.
    jobs.evaluate_run(cfg, follow=False)
    assert len(state["loaded"]) == 6


def test_without_a_checkpoint_the_job_says_so(tmp_path):
    cfg = load(JobConfig, CONFIGS / "demo_cpu.yaml", [f"run.dir={tmp_path}"])
    with pytest.raises(FileNotFoundError, match="no checkpoint to evaluate"):
        jobs.evaluate_run(cfg)


@pytest.mark.multiprocess  # vLLM, in a process of its own
def test_the_evaluators_engine_takes_the_next_checkpoint_in_place(tmp_path):
    proc = run_script(script("model_evaluator_reload"), tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    gaps = {  # vLLM's own lines may be there too
        words[0]: float(words[1])
        for words in map(str.split, proc.stdout.splitlines())
        if words and words[0] in ("FIRST", "SECOND", "STALE")
    }
    assert gaps["STALE"] > 1e-2  # the models differ: the check is not vacuous
    assert gaps["FIRST"] <= 1e-4 and gaps["SECOND"] <= 1e-4, gaps
