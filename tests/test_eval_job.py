"""The evaluation job (rlef_hpc.launch.eval_job) without vLLM: a fake engine, fake
exports, checkpoints that appear while it evaluates. Each due checkpoint is evaluated exactly
once, in order, also across a requeue; the best on valid is moved to best/; the other exports
are deleted. A stop signal ends it within one generation batch, keeping what is recorded; a
trainer whose Slurm job has ended ends its wait."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from rlef_hpc.checkpoint import training
from rlef_hpc.config import load
from rlef_hpc.data import synthetic
from rlef_hpc.episodes import Generation
from rlef_hpc.eval import policy
from rlef_hpc.eval.results import read_results
from rlef_hpc.eval.sets import problems_path
from rlef_hpc.launch import eval_job
from rlef_hpc.launch.config import JobConfig
from rlef_hpc.train.preemption import EXIT_PREEMPTED, Preempted
from rlef_hpc.train.problems import write_problems
from tests.helpers import TESTS_DIR, require, run_script, script, trajectory

CONFIGS = TESTS_DIR.parent / "configs"
SKILL = {0: 0.0, 2: 0.5, 3: 0.5, 4: 1.0, 6: 0.5, 7: 0.5}  # the share of problems each policy solves


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
    write_problems(problems[:2], problems_path(run, "valid"))
    write_problems(problems[2:], problems_path(run, "test"))
    trainer = FakeTrainer(run)
    state = {"next": 1, "loaded": [], "kill_after": None, "last_saved": 7}

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
                if state["next"] <= state["last_saved"]:
                    trainer.save(state["next"])
                    state["next"] += 1

        def generator(self):
            def generate(problems, temperature, top_p, key, stop):
                names = list(dict.fromkeys(p.name for p in problems))
                solved = set(names[: round(len(names) * self.skill)])
                return [trajectory(p.name, p.name in solved, 1) for p in problems]

            return generate

    monkeypatch.setattr(policy, "ModelEvaluator", Evaluator)
    monkeypatch.setattr("rlef_hpc.checkpoint.convert.export_hf", export_hf)
    cfg = load(JobConfig, CONFIGS / "demo_cpu.yaml", [
        f"run.dir={run}", "run.iterations=7", "run.eval_every=2", "eval.rollouts_per_problem=1",
        "eval.metrics=[{name: 1@3}]", "rollout.layout=disaggregated", "rollout.sandbox_workers=1",
    ])  # fmt: skip
    return run, cfg, state


def iterations(run):
    return [r.iteration for r in read_results(run)]


def test_follows_checkpoints_and_evaluates_each_due_one_once(run):
    run, cfg, state = run
    best = eval_job.run(cfg, follow=True, poll_s=0.01)
    # 0, every second iteration, and the last (7), in order, each loaded once.
    assert iterations(run) == [0, 2, 4, 6, 7]
    assert state["loaded"] == ["init", "iter_0000002", "iter_0000004", "iter_0000006",
                               "iter_0000007"]  # fmt: skip
    assert best.result.iteration == 4 and best.result.estimate("1@3", "test").mean == 1.0
    assert json.loads((run / "best" / "selected.json").read_text())["iteration"] == 4
    assert json.loads((run / "best" / "config.json").read_text())["from"] == "iter_0000004"
    assert not list((run / "export").iterdir())  # the rest deleted once evaluated
    assert "| 4 (best) |" in (run / "eval" / "curve.md").read_text()


def test_a_requeue_neither_repeats_nor_skips_an_evaluation(run):
    run, cfg, state = run
    state["kill_after"] = 2  # killed while loading the third model (iteration 4)
    with pytest.raises(Killed):
        eval_job.run(cfg, follow=True, poll_s=0.01)
    assert iterations(run) == [0, 2]
    state["kill_after"] = None
    eval_job.run(cfg, follow=True, poll_s=0.01)  # the requeued job
    assert iterations(run) == [0, 2, 4, 6, 7]
    assert state["loaded"][3:] == ["iter_0000004", "iter_0000006", "iter_0000007"]
    # Run again after training: nothing left to do, nothing redone.
    eval_job.run(cfg, follow=False)
    assert len(state["loaded"]) == 6


def test_without_a_checkpoint_the_job_says_so(tmp_path):
    cfg = load(JobConfig, CONFIGS / "demo_cpu.yaml", [f"run.dir={tmp_path}"])
    with pytest.raises(FileNotFoundError, match="no checkpoint to evaluate"):
        eval_job.run(cfg)


class SlowEngine:
    """vLLM's engine as ModelEvaluator drives it: every prompt answered after `delay_s` with a
    reply that holds no code (an invalid turn: no sandbox run, all turns taken). Its
    `signal_at`-th call sends this process SIGTERM: a stop signal during an evaluation."""

    def __init__(self, tokenizer, delay_s):
        self.tokens = tokenizer.encode("no idea" + tokenizer.eos_token, add_special_tokens=False)
        self.delay_s, self.calls, self.signal_at, self.signalled = delay_s, 0, None, None

    def __call__(self, prompts, temperature, top_p):
        self.calls += 1
        if self.calls == self.signal_at:
            self.signalled = time.monotonic()
            os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(self.delay_s)
        return [Generation(self.tokens, [-0.5] * len(self.tokens)) for _ in prompts]

    def update_weights_from(self, weights):
        pass


@pytest.fixture
def ignore_sigterm():
    """A SIGTERM that no handler of the code under test takes is ignored, not the test
    process's end."""
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_a_stop_signal_ends_the_evaluation_within_a_batch_and_the_requeue_redoes_it(
    tmp_path, monkeypatch, ignore_sigterm
):
    """Issue 33: SIGTERM during the evaluation of a checkpoint ends the job with status 75
    within one generation batch, not after the evaluation; what was recorded stays, nothing of
    the interrupted checkpoint is; the requeued job evaluates it (and only what is left)."""
    from rlef_hpc.models.tokenizer import build_tokenizer

    run = tmp_path / "run"
    problems = synthetic.generate(4, "heldout", 0)
    tokenizer = build_tokenizer([p.description for p in problems] + ["no idea"], 300)
    tokenizer.save_pretrained(run / "init")
    (run / "init" / "config.json").write_text("{}")
    write_problems(problems[:2], problems_path(run, "valid"))
    write_problems(problems[2:], problems_path(run, "test"))
    for iteration in (1, 2):
        FakeTrainer(run).save(iteration)
    engine = SlowEngine(tokenizer, delay_s=0.3)
    monkeypatch.setattr(policy, "build_engine", lambda *args, **kwargs: engine)
    # An export: the model's config and the tokenizer (the engine above stands in for weights).
    monkeypatch.setattr(
        "rlef_hpc.checkpoint.convert.export_hf",
        lambda checkpoint, out: shutil.copytree(run / "init", out),
    )
    cfg = load(JobConfig, CONFIGS / "demo_cpu.yaml", [
        f"run.dir={run}", "run.iterations=2", "run.eval_every=1", "eval.rollouts_per_problem=64",
        "eval.metrics=[{name: 1@3}]", "rollout.sandbox_workers=1",
    ])  # fmt: skip
    # Per checkpoint: 2 sets x 128 episodes x 3 turns in batches of 64 = 12 engine calls.
    engine.signal_at = 12 + 2  # early in iteration 1's evaluation: 10 calls (3 s) to go
    with pytest.raises(Preempted) as stopped:
        eval_job.run(cfg)
    seconds = time.monotonic() - engine.signalled
    assert stopped.value.code == EXIT_PREEMPTED and stopped.value.signum == signal.SIGTERM
    assert engine.calls == engine.signal_at  # the batch in progress ends; no other starts
    assert seconds < 1.5, seconds
    assert iterations(run) == [0]  # kept; the interrupted one not recorded

    engine.signal_at, calls = None, engine.calls
    eval_job.run(cfg)  # the requeued job
    assert iterations(run) == [0, 1, 2]
    assert engine.calls - calls == 2 * 12  # 1 (redone) and 2; not 0 again
    assert read_results(run)[1].estimate("1@3").mean == 0.0


@pytest.mark.parametrize(("signum", "requeues"), [(signal.SIGUSR2, 1), (signal.SIGTERM, 0)])
def test_the_submitit_job_stopped_requeues_itself_unless_slurm_does(monkeypatch, signum, requeues):
    """EvalJob stopped by submitit's time-limit signal asks Slurm to requeue it; on SIGTERM
    Slurm is requeueing (or cancelling) it already. Either way it exits with status 75."""
    from rlef_hpc.config import to_dict
    from rlef_hpc.launch import jobs

    asked = []

    def stopped(*args, **kwargs):
        raise Preempted(signum)

    monkeypatch.setattr(eval_job, "run", stopped)
    monkeypatch.setattr(jobs, "requeue_this_job", lambda: asked.append(True))
    config = to_dict(load(JobConfig, CONFIGS / "demo_cpu.yaml"))
    with pytest.raises(Preempted) as stop:
        jobs.EvalJob(config, follow=True, trainer_job="12")()
    assert stop.value.code == EXIT_PREEMPTED and len(asked) == requeues


@pytest.mark.slurm
def test_a_following_job_ends_with_what_is_due_once_the_trainers_job_has_ended(run, tmp_path):
    """Issue 33: the trainer's job dies (here: a Slurm job that fails) after saving iteration 3
    of 7; the evaluation job following it sees the job's end in Slurm's accounting, evaluates
    what is due and where the trainer stood (3), and ends instead of waiting for iteration 7
    until its own time limit."""
    from rlef_hpc.launch.slurm import SlurmUnavailable, require_slurm

    try:
        require_slurm(timeout=10)
    except SlurmUnavailable as e:
        require(False, f"{e}: start one with `slurm/local/up.sh` and `source /tmp/rlef-slurm/env`")
    run, cfg, state = run
    state["last_saved"] = 3
    trainer = subprocess.run(
        ["sbatch", "--parsable", "--job-name=rlef-test-trainer", f"--output={tmp_path}/%j.out",
         "--wrap", "sleep 2; exit 1"],
        capture_output=True, text=True, check=True, cwd=tmp_path,
    ).stdout.strip()  # fmt: skip

    def too_long(signum, frame):
        raise TimeoutError("the evaluation job still waits for a trainer that has ended")

    previous = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(120)
    try:
        best = eval_job.run(cfg, follow=True, trainer_job=trainer, poll_s=0.2)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert iterations(run) == [0, 2, 3]
    assert best.result.iteration == 2  # 3 solves as many: the earlier is selected


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
