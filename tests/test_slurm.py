"""Slurm launch against a real cluster: the local one from slurm/local/up.sh (.ci/run starts
it; elsewhere these tests skip, saying how to start it). sbatch scripts, tools/submit.py in
both layouts with a requeue in the middle, cancel, --dry-run, and the bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import TESTS_DIR, TINY_TRAIN, require, run_tool

REPO = TESTS_DIR.parent
TINY = [*TINY_TRAIN, "rollout.shard_rollouts=8"]


@pytest.fixture(scope="module")
def slurm() -> None:
    from rlef_hpc.launch.slurm import SlurmUnavailable, require_slurm

    try:
        require_slurm(timeout=10)
    except SlurmUnavailable as e:
        require(False, f"{e}: start one with `slurm/local/up.sh` and `source /tmp/rlef-slurm/env`")


def sh(*cmd: object, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def state(job: str) -> str:
    out = sh("sacct", "-n", "-X", "-P", "-o", "State", "-j", job).stdout.split()
    return out[0] if out else "UNKNOWN"


def wait_done(job: str, timeout: float = 600) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = state(job)
        if s in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"):
            return s
        time.sleep(1)
    raise TimeoutError(f"job {job} still {state(job)} after {timeout} s")


def train_iterations(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [r["iteration"] for r in records if r["kind"] == "train"]


def wait_iterations(run: Path, n: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while len(train_iterations(run)) < n:
        assert time.monotonic() < deadline, f"{run}: not {n} iterations in {timeout} s"
        time.sleep(0.5)


def scheduler_steps(run: Path) -> int:
    from rlef_hpc.checkpoint import training

    state = torch.load(training.latest(run) / "trainer_state.pt", weights_only=False)
    return state["schedulers"]["policy"]["num_steps"]


def submit(*args: object) -> dict:
    proc = run_tool("submit.py", REPO / "configs" / "demo_cpu.yaml", *TINY, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[0])


@pytest.mark.slurm
def test_sbatch_demo_script_trains_and_leaves_a_checkpoint(slurm, tmp_path):
    run = tmp_path / "run"
    proc = sh(
        "sbatch",
        "--wait",
        "--output",
        tmp_path / "job.out",
        REPO / "slurm" / "train_demo.sh",
        *TINY,
        f"run.dir={run}",
        "run.iterations=2",
        timeout=600,
    )
    log = (tmp_path / "job.out").read_text()
    assert proc.returncode == 0, proc.stderr + log[-3000:]
    assert train_iterations(run) == [1, 2]
    assert (run / "latest").read_text().strip() == "2" and (run / "iter_0000002").is_dir()


@pytest.mark.slurm
def test_submit_colocated_requeued_midway_resumes_and_finishes_the_same(slurm, tmp_path):
    run = tmp_path / "run"
    jobs = submit(f"run.dir={run}", "run.iterations=6")
    wait_iterations(run, 2)
    assert sh("scontrol", "requeue", jobs["train"]).returncode == 0
    assert wait_done(jobs["train"]) == "COMPLETED"
    log = next((run / "slurm" / jobs["train"]).glob("*_0_log.out")).read_text()
    assert "signal SIGTERM: checkpointing after this iteration" in log
    assert "resumed from" in log
    # Every iteration once, and the optimizer stepped exactly as often as without the requeue
    # (the warm-up pre-step + 2 minibatches an iteration).
    assert train_iterations(run) == [1, 2, 3, 4, 5, 6]
    assert scheduler_steps(run) == 1 + 2 * 6
    # The evaluation job ran after training, on the exported last checkpoint.
    assert wait_done(jobs["eval"]) == "COMPLETED"
    report = json.loads((run / "eval" / "job_iter_0000006" / "report.json").read_text())
    assert report["rows"][0]["name"] == "1@3" and report["rows"][0]["problems"] == 4
    status = run_tool("submit.py", "status", run)
    assert status.returncode == 0 and "| train | " in status.stdout and "COMPLETED" in status.stdout


@pytest.mark.slurm
def test_submit_disaggregated_survives_requeues_without_losing_a_shard(slurm, tmp_path):
    from rlef_hpc.rollout.shards import ShardStore

    run = tmp_path / "run"
    jobs = submit(
        f"run.dir={run}", "run.iterations=6", "rollout.workers=2", "--layout", "disaggregated"
    )
    assert len(jobs["rollout"]) == 2
    wait_iterations(run, 2)
    # Either side stopped midway: the trainer and worker 1 by submitit's time-limit signal
    # (they requeue themselves; the trainer checkpoints first), worker 0 by `scontrol requeue`.
    assert sh("scancel", "--signal=USR2", jobs["train"]).returncode == 0
    assert sh("scontrol", "requeue", jobs["rollout"][0]).returncode == 0
    assert sh("scancel", "--signal=USR2", jobs["rollout"][1]).returncode == 0
    for job in (jobs["train"], *jobs["rollout"], jobs["eval"]):
        assert wait_done(job) == "COMPLETED", job
    assert train_iterations(run) == [1, 2, 3, 4, 5, 6]
    assert scheduler_steps(run) == 1 + 2 * 6
    store = ShardStore(run)
    counts = store.audit()  # raises on a shard in two places or a gap in a worker's numbers
    assert counts["claimed"] == 6 * 2  # 16 rollouts an iteration, 8 a shard
    for it in range(1, 7):
        assert len(list(store.iteration_dir(it).glob("*.pt"))) == 2
    log = next((run / "slurm" / jobs["train"]).glob("*_0_log.out")).read_text()
    assert "signal SIGUSR2: checkpointing after this iteration" in log and "resumed from" in log
    for worker in jobs["rollout"]:  # each worker ran again
        log = next((run / "slurm" / worker).glob("*_0_log.out")).read_text()
        assert log.count("Starting with JobEnvironment") == 2, worker


@pytest.mark.slurm
def test_cancel_leaves_no_job_and_no_process(slurm, tmp_path):
    run = tmp_path / "run"
    jobs = submit(f"run.dir={run}", "run.iterations=200", "--layout", "disaggregated")
    wait_iterations(run, 1)
    proc = run_tool("submit.py", "cancel", run)
    assert proc.returncode == 0, proc.stderr
    ids = [jobs["train"], *jobs["rollout"], jobs["eval"]]
    assert sh("squeue", "-h", "-j", ",".join(ids)).stdout.strip() == ""
    deadline = time.monotonic() + 30
    while sh("pgrep", "-f", str(run)).stdout.strip():  # SIGKILL follows KillWait
        assert time.monotonic() < deadline, sh("pgrep", "-af", str(run)).stdout
        time.sleep(0.5)


@pytest.mark.slurm
def test_dry_run_of_the_70b_config_is_an_sbatch_script_slurm_accepts(slurm, tmp_path):
    proc = run_tool(
        "submit.py", REPO / "configs" / "llama3_70b.yaml", "--dry-run", "--job", "train"
    )
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout
    assert script.startswith("#!/bin/bash")
    directives = dict(
        line[len("#SBATCH --") :].split("=", 1) if "=" in line else (line[len("#SBATCH --") :], "")
        for line in script.splitlines()
        if line.startswith("#SBATCH --")
    )
    assert directives["nodes"] == "128" and directives["gpus-per-node"] == "8"
    assert directives["ntasks-per-node"] == "8" and "requeue" in directives
    assert directives["signal"].startswith("USR2@")
    assert "srun" in script and "submitit.core._submit" in script
    path = tmp_path / "train_70b.sbatch"
    path.write_text(script)
    # The local cluster is one node of 8 stand-in GPUs and 16 CPUs: only the node, CPU and
    # memory counts are scaled down; every other directive is the script's own.
    for script_path in (path, REPO / "slurm" / "train_70b.sh", REPO / "slurm" / "train_8b.sh"):
        test = sh(
            "sbatch", "--test-only", "--nodes=1", "--cpus-per-task=1", "--mem=1G", script_path
        )
        assert test.returncode == 0 and "to start at" in test.stderr, (script_path, test.stderr)


def test_a_colocated_tensor_parallel_run_is_refused_before_anything_is_written(tmp_path):
    """No cluster needed: the config is refused before submitit or Slurm is asked."""
    run = tmp_path / "run"
    demo = REPO / "configs" / "demo_cpu.yaml"
    for dry_run in (["--dry-run"], []):
        proc = run_tool("submit.py", demo, "parallel.tensor=2", f"run.dir={run}", *dry_run)
        assert proc.returncode == 2 and proc.stdout == "", proc.stdout
        assert proc.stderr.startswith("submit: error:") and proc.stderr.count("\n") == 1
        for key in ("parallel.tensor=2", "parallel.pipeline", "rollout.layout=colocated"):
            assert key in proc.stderr, proc.stderr
    assert not run.exists()


def test_bad_inputs_are_refused_before_anything_is_submitted(tmp_path):
    demo = REPO / "configs" / "demo_cpu.yaml"
    cases = {
        "slurm.nodes=100": [REPO / "configs" / "llama3_70b.yaml", "slurm.nodes=100"],
        "does not divide slurm.gpus_per_node=6": [
            REPO / "configs" / "llama3_70b.yaml",
            "slurm.gpus_per_node=6",
        ],
        "its parent directory": [demo, "run.dir=/nonexistent/runs/x"],
    }
    for message, args in cases.items():
        proc = run_tool("submit.py", *args)
        assert proc.returncode == 2, proc.stdout
        assert message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    # Slurm not reachable: a controller that does not answer.
    conf = tmp_path / "slurm.conf"
    conf.write_text(
        "ClusterName=nowhere\nSlurmctldHost=localhost\nSlurmctldPort=9\n"
        "NodeName=localhost CPUs=1\nPartitionName=p Nodes=localhost Default=YES\n"
    )
    env = {**os.environ, "SLURM_CONF": str(conf), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, REPO / "tools" / "submit.py", demo, f"run.dir={tmp_path / 'run'}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2 and "Slurm controller is not reachable" in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()
    proc = run_tool("submit.py", "status", tmp_path / "missing")
    assert proc.returncode == 2 and "no such run directory" in proc.stderr


@pytest.mark.slurm
def test_disaggregated_worker_steps_share_a_node_with_their_own_gpus_and_memory(slurm, tmp_path):
    """slurm/lib.sh's worker steps on one node of the stand-in GPUs: each step its own two
    devices and a task's share of the memory, all four running at once (with the job's
    --gpus-per-node each saw all eight and the next waited: "Requested nodes are busy")."""
    seen = tmp_path / "seen"
    seen.mkdir()
    # A stand-in Python: each step records its devices and memory; a worker then waits until
    # all four workers are running at the same time.
    fake = tmp_path / "python"
    fake.write_text(
        "#!/bin/bash\n"
        "mem=$(scontrol -o show step $SLURM_JOB_ID.$SLURM_STEP_ID | grep -o 'mem=[0-9]*.')\n"
        f'echo "$CUDA_VISIBLE_DEVICES $mem" > {seen}/$2.$SLURM_STEP_ID.$SLURM_PROCID\n'
        '[ "$2" = rlef_hpc.train.rollout_worker ] || exit 0\n'
        "for _ in $(seq 300); do\n"
        f"  [ $(ls {seen} | grep -c rollout_worker) -ge 4 ] && exit 0; sleep 0.1\n"
        "done\n"
        "exit 1\n"
    )
    fake.chmod(0o755)
    job = tmp_path / "job.sh"
    job.write_text(
        "#!/bin/bash\nsource slurm/lib.sh\nrlef_disaggregated 1 4 2 configs/demo_cpu.yaml\n"
    )
    proc = sh(
        "sbatch", "--wait", "--output", tmp_path / "job.out", "--nodes=1", "--ntasks=8",
        "--cpus-per-task=1", "--gpus-per-node=8", "--mem=800M", "--time=5",
        f"--export=ALL,RLEF_PYTHON={fake}", job, timeout=300,
    )  # fmt: skip
    log = (tmp_path / "job.out").read_text()
    assert proc.returncode == 0, proc.stderr + log[-3000:]
    workers = [p.read_text().split() for p in sorted(seen.glob("rlef_hpc.train.rollout_worker.*"))]
    assert len(workers) == 4, log
    devices = [set(d.split(",")) for d, _ in workers]
    assert all(len(d) == 2 for d in devices) and len(set().union(*devices)) == 8, workers
    assert {mem for _, mem in workers} == {"mem=100M"}, workers  # 800M over 8 tasks
    # One trainer task here (its step waits for the workers' GPUs: it asks the job's eight).
    (trainer,) = seen.glob("rlef_hpc.train.cli.*")
    assert trainer.read_text().split()[-1] == "mem=100M"


def sbatch_directives(script: str) -> dict[str, str]:
    return dict(
        line[len("#SBATCH --") :].partition("=")[::2]
        for line in script.splitlines()
        if line.startswith("#SBATCH --")
    )


def test_a_rollout_or_eval_job_asks_its_share_of_a_node_and_the_trainer_the_node(tmp_path):
    """slurm.mem_gb is per node: a rollout worker (or the evaluation) on rollout.tensor_parallel
    of a node's GPUs asks that share of it, not a whole node's memory."""
    from rlef_hpc.config import load
    from rlef_hpc.launch.config import JobConfig
    from rlef_hpc.launch.submit import sbatch_script

    cfg = load(JobConfig, REPO / "configs" / "llama3_8b.yaml", [f"run.dir={tmp_path / 'run'}"])
    train = sbatch_directives(sbatch_script(cfg, "train"))
    assert train["mem"] == "1600GB" and train["gpus-per-node"] == "8"
    for job in ("rollout", "eval"):  # 2 of 8 GPUs
        d = sbatch_directives(sbatch_script(cfg, job))
        assert d["mem"] == "400GB" and d["gpus-per-node"] == "2" and d["nodes"] == "1", d
    # CPU clusters: one trainer task's share of the node (two trainer tasks on one node).
    cfg = load(
        JobConfig,
        REPO / "configs" / "demo_cpu.yaml",
        ["parallel.data=2", "slurm.mem_gb=8", "rollout.layout=disaggregated", "run.dir=/tmp/r"],
    )
    assert sbatch_directives(sbatch_script(cfg, "train"))["mem"] == "8GB"
    assert sbatch_directives(sbatch_script(cfg, "rollout"))["mem"] == "4GB"


@pytest.mark.slurm
@pytest.mark.multiprocess
def test_the_trainer_under_srun_with_gpus_refuses_to_run_without_cuda(slurm, tmp_path):
    """The sbatch path (slurm/*.sh): the trainer in a step that has two stand-in GPUs."""
    require(not torch.cuda.is_available(), "CUDA is here: the refusal is for machines without")
    proc = sh(
        "srun", "--ntasks=1", "--cpus-per-task=1", "--gpus-per-node=2", "--mem=2G",
        "--time=5", "env", f"PYTHONPATH={REPO}", sys.executable, "-m", "rlef_hpc.train.cli",
        REPO / "configs" / "demo_cpu.yaml", f"run.dir={tmp_path / 'run'}", timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "error: the job asked for GPUs (SLURM_GPUS_ON_NODE=2)" in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()
