"""Slurm launch against a real cluster: the local one from slurm/local/up.sh (.ci/run starts
three nodes; elsewhere these tests skip, saying how to start it). sbatch scripts, tools/submit.py
in both layouts with a requeue in the middle, cancel, --dry-run, and the bad inputs; the
multi-node layouts: the rendezvous at the first node, trainer and worker steps on the nodes
the layout says (8B and 70B shapes, fewer nodes), a TP group never across nodes."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import TESTS_DIR, TINY_TRAIN, require, run_tool, script

REPO = TESTS_DIR.parent
TINY = [*TINY_TRAIN, "rollout.shard_rollouts=8"]


@pytest.fixture(scope="module")
def slurm() -> None:
    from rlef_hpc.launch.slurm import SlurmUnavailable, require_slurm

    try:
        require_slurm(timeout=10)
    except SlurmUnavailable as e:
        require(False, f"{e}: start one with `slurm/local/up.sh` and `source /tmp/rlef-slurm/env`")


def cluster_nodes(n: int) -> list[str]:
    """The local cluster's node names, sorted; fails (CI) or skips unless it has `n` or more."""
    out = sh("sinfo", "-h", "-N", "-o", "%N").stdout.split()
    names = sorted(set(out), key=lambda name: (len(name), name))
    require(
        len(names) >= n,
        f"a Slurm cluster of {n} nodes ({len(names)} here): "
        f"`slurm/local/down.sh && NODES={n} slurm/local/up.sh`",
    )
    return names


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
    # The trainer evaluated the initial policy and the last checkpoint (colocated: its own
    # engine); the evaluation job after it found nothing left to evaluate.
    assert wait_done(jobs["eval"]) == "COMPLETED"
    results = [json.loads(x) for x in (run / "eval" / "results.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in results] == [0, 6]
    assert results[-1]["sets"]["valid"]["metrics"]["1@3"]["problems"] == 4
    assert (run / "best" / "selected.json").exists()
    status = run_tool("submit.py", "status", run)
    assert status.returncode == 0 and "| train | " in status.stdout and "COMPLETED" in status.stdout
    assert "best checkpoint on valid 1@3" in status.stdout


@pytest.mark.slurm
def test_submit_disaggregated_on_two_nodes_survives_requeues_without_losing_a_shard(
    slurm, tmp_path
):
    """The demo's multi-node shape through tools/submit.py: a trainer job of two nodes, TP2 on
    each x DP2, and two rollout-worker jobs; each side requeued mid-run."""
    from rlef_hpc.dist_env import expand_hostlist
    from rlef_hpc.rollout.shards import ShardStore

    cluster_nodes(2)
    run = tmp_path / "run"
    jobs = submit(
        f"run.dir={run}", "run.iterations=6", "rollout.workers=2", "--layout", "disaggregated",
        "slurm.nodes=2", "parallel.tensor=2", "parallel.data=2", "model.num_query_groups=2",
    )  # fmt: skip
    assert len(jobs["rollout"]) == 2
    wait_iterations(run, 2)
    nodes = sh("squeue", "-h", "-o", "%N", "-j", jobs["train"]).stdout.strip()
    assert len(expand_hostlist(nodes)) == 2, nodes
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
    # Four trainer tasks, both runs of the job: ranks 0-1 (a TP pair) on its first node, 2-3
    # on its second (submitit's JobEnvironment: node=index(nodes), global_rank=rank(tasks)).
    placed = set()
    for path in (run / "slurm" / jobs["train"]).glob("*_log.out"):
        placed |= set(re.findall(r"node=(\d)\(2\), global_rank=(\d)\(4\)", path.read_text()))
    assert placed == {("0", "0"), ("0", "1"), ("1", "2"), ("1", "3")}, placed
    for worker in jobs["rollout"]:  # each worker ran again
        log = next((run / "slurm" / worker).glob("*_0_log.out")).read_text()
        assert log.count("Starting with JobEnvironment") == 2, worker


@pytest.mark.slurm
def test_disaggregated_run_is_evaluated_every_eval_every_while_it_trains(slurm, tmp_path):
    """Issue 19's acceptance: the evaluation job follows the checkpoints while training goes on;
    requeued midway, it neither repeats nor skips an evaluation; the best is exported."""
    run = tmp_path / "run"
    # Long enough (about 2 min of training here) that the evaluation job, whose start alone
    # (vLLM's engine) outlasts 20 iterations of the demo, evaluates while training goes on.
    jobs = submit(f"run.dir={run}", "run.iterations=100", "run.eval_every=25",
                  "run.keep_last=1", "--layout", "disaggregated")  # fmt: skip
    results = run / "eval" / "results.jsonl"
    deadline = time.monotonic() + 600
    while not results.exists() or '"iteration": 25,' not in results.read_text():
        assert time.monotonic() < deadline, "no evaluation of iteration 25"
        time.sleep(1)
    trained = train_iterations(run)
    assert sh("scontrol", "requeue", jobs["eval"]).returncode == 0
    for job in (jobs["train"], *jobs["rollout"], jobs["eval"]):
        assert wait_done(job, timeout=1200) == "COMPLETED", job
    assert len(trained) < 100, "training had finished before the first periodic evaluation"
    records = [json.loads(x) for x in results.read_text().splitlines()]
    assert [r["iteration"] for r in records] == [0, 25, 50, 75, 100]
    best = json.loads((run / "eval" / "best.json").read_text())
    assert (
        json.loads((run / "best" / "selected.json").read_text())["iteration"] == best["iteration"]
    )
    assert "test" in best["sets"] and (run / "eval" / "curve.png").exists()
    log = "".join(p.read_text() for p in (run / "slurm" / jobs["eval"]).glob("*_log.out"))
    for it in (0, 25, 50, 75, 100):
        assert log.count(f"evaluated iteration {it}:") == 1, it


@pytest.mark.slurm
def test_an_evaluation_job_following_a_trainer_that_died_evaluates_what_it_saved_and_ends(
    slurm, tmp_path
):
    """Issue 33: the trainer's job is killed (SIGKILL to all its processes, as an OOM kill or
    a lost node would) while the evaluation job follows it; the evaluation job sees in Slurm
    that the job has ended, evaluates what is due and the last checkpoint saved, and completes,
    instead of waiting for iteration 100 until its own time limit."""
    run = tmp_path / "run"
    jobs = submit(f"run.dir={run}", "run.iterations=100", "run.eval_every=50",
                  "--layout", "disaggregated")  # fmt: skip
    try:
        wait_iterations(run, 3, timeout=600)
        assert sh("scancel", "--signal=KILL", "--full", jobs["train"]).returncode == 0
        wait_done(jobs["train"], timeout=120)
        assert wait_done(jobs["eval"], timeout=600) == "COMPLETED"
    finally:
        sh("scancel", *jobs["rollout"], jobs["eval"])  # the workers wait for the trainer
    saved = int((run / "latest").read_text())
    results = [json.loads(x) for x in (run / "eval" / "results.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in results] == [0, saved]
    log = "".join(p.read_text() for p in (run / "slurm" / jobs["eval"]).glob("*_log.out"))
    assert f"the trainer's job {jobs['train']} has ended" in log


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
    # The local cluster's nodes have 8 stand-in GPUs and 16 CPUs each: only the node count
    # (still several where the cluster has them: 2), CPUs and memory are scaled down; every
    # other directive is the script's own. (slurm/train_*.sh run for real on 3 nodes: the
    # placement test below.)
    nodes = min(2, len(set(sh("sinfo", "-h", "-N", "-o", "%N").stdout.split())))
    scripts = ("train_70b.sh", "train_8b.sh", "train_8b_1node.sh")
    for script_path in (path, *(REPO / "slurm" / name for name in scripts)):
        test = sh(
            "sbatch", "--test-only", f"--nodes={nodes}", "--cpus-per-task=1", "--mem=1G",
            script_path,
        )  # fmt: skip
        assert test.returncode == 0 and "to start at" in test.stderr, (script_path, test.stderr)


def test_a_colocated_pipeline_parallel_run_is_refused_before_anything_is_written(tmp_path):
    """No cluster needed: the config is refused before submitit or Slurm is asked."""
    run = tmp_path / "run"
    demo = REPO / "configs" / "demo_cpu.yaml"
    for dry_run in (["--dry-run"], []):
        proc = run_tool("submit.py", demo, "parallel.pipeline=2", f"run.dir={run}", *dry_run)
        assert proc.returncode == 2 and proc.stdout == "", proc.stdout
        assert proc.stderr.startswith("submit: error:") and proc.stderr.count("\n") == 1
        for key in ("parallel.pipeline=2", "rollout.layout=colocated"):
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


# ---- several nodes: the local cluster's node1..nodeN (NODES=3 slurm/local/up.sh) ----------


def steps_by_tasks(job: str) -> dict[int, list[str]]:
    """The job's steps from accounting: task count -> the node list of each such step."""
    out: dict[int, list[str]] = {}
    for line in sh("sacct", "-n", "-P", "-o", "JobID,NTasks,NodeList", "-j", job).stdout.split():
        step, tasks, nodes = line.split("|")
        if "." in step and step.split(".")[1].isdigit():  # numbered srun steps, not batch
            out.setdefault(int(tasks), []).append(nodes)
    return out


@pytest.mark.slurm
@pytest.mark.multiprocess
def test_ranks_on_two_nodes_meet_at_the_first_nodes_address(slurm):
    """srun of 2 tasks on each of two nodes: every rank takes the job's first node as the
    rendezvous (rlef_hpc.dist_env, from Slurm's variables), resolves it to that node's own
    address, and a gloo all-gather over the four sees ranks 0-1 on the first node, 2-3 on the
    second."""
    first, second = cluster_nodes(2)[:2]
    proc = sh(
        "srun", f"--nodelist={first},{second}", "--nodes=2", "--ntasks-per-node=2",
        "--mem=500M", "--time=5", "env", f"PYTHONPATH={REPO}", "OMP_NUM_THREADS=1",
        sys.executable, script("slurm_rendezvous"), timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ranks = sorted((json.loads(line) for line in proc.stdout.splitlines()), key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == [0, 1, 2, 3], proc.stdout
    address = socket.gethostbyname(first)
    assert address != socket.gethostbyname(second)  # each node its own address
    for r in ranks:
        assert r["master"] == first and r["master_ip"] == address, r
        assert r["peers"] == [first, first, second, second], r
    assert len({r["port"] for r in ranks}) == 1


@pytest.mark.slurm
def test_the_8b_and_70b_scripts_place_trainer_and_workers_on_the_nodes_of_their_layout(
    slurm, tmp_path
):
    """slurm/train_8b.sh and train_70b.sh as shipped (8 tasks and 8 GPUs a node, --exclusive),
    on 3 nodes instead of 20 and 160 (TRAIN_NODES=2; CPUs a task scaled down), a stand-in
    Python recording each task's node and devices: the trainer's ranks fill the first two
    nodes in order, 8 a node, and each worker step runs on the third node with GPUs of its own
    (8B: four workers at TP2 share it; 70B: one at TP8 takes it)."""
    nodes = cluster_nodes(3)[:3]
    fake = tmp_path / "python"
    fake.write_text(
        "#!/bin/bash\n"
        'echo "$SLURMD_NODENAME $SLURM_PROCID ${CUDA_VISIBLE_DEVICES:-none}"'
        f" > {tmp_path}/$2.$SLURM_STEP_ID.$SLURM_PROCID\n"
    )
    fake.chmod(0o755)
    for script_name, workers, gpus in (("train_8b.sh", 4, 2), ("train_70b.sh", 1, 8)):
        for old in tmp_path.glob("rlef_hpc.*"):
            old.unlink()
        proc = sh(
            "sbatch", "--wait", "--output", tmp_path / f"{script_name}.out",
            f"--nodelist={','.join(nodes)}", "--nodes=3", "--cpus-per-task=1", "--time=5",
            f"--export=ALL,RLEF_PYTHON={fake},TRAIN_NODES=2,WORKERS={workers}",
            REPO / "slurm" / script_name, timeout=300,
        )  # fmt: skip
        log = (tmp_path / f"{script_name}.out").read_text()
        assert proc.returncode == 0, proc.stderr + log[-3000:]
        seen = {p.name: p.read_text().split() for p in tmp_path.glob("rlef_hpc.*")}
        trainer = sorted(
            (int(rank), node) for name, (node, rank, _) in seen.items() if ".train.cli." in name
        )
        assert trainer == [(r, nodes[r // 8]) for r in range(16)], (script_name, trainer)
        rollout = [v for name, v in seen.items() if ".rollout_worker." in name]
        assert len(rollout) == workers, (script_name, seen)
        assert {node for node, _, _ in rollout} == {nodes[2]}, (script_name, rollout)
        devices = [set(d.split(",")) for _, _, d in rollout]
        assert all(len(d) == gpus for d in devices), (script_name, rollout)
        assert len(set().union(*devices)) == workers * gpus, (script_name, rollout)


@pytest.mark.slurm
def test_the_one_node_8b_script_places_8_ranks_on_one_node_and_requeues(slurm, tmp_path):
    """slurm/train_8b_1node.sh as shipped (8 tasks and 8 GPUs on one node, --exclusive; CPUs a
    task scaled down), a stand-in Python recording each task's node, rank, local rank and
    devices, and exiting 75 (stopped with a checkpoint) on the job's first run: the 8 ranks
    share one node, local ranks 0-7, each seeing all 8 of the node's stand-in GPUs (a rank's
    engine takes cuda:LOCAL_RANK); the trainer gets the one-node config; the script requeues
    the job, which runs again (SLURM_RESTART_COUNT 1) and completes."""
    node = cluster_nodes(1)[0]
    fake = tmp_path / "python"
    fake.write_text(
        "#!/bin/bash\n"
        'echo "$SLURMD_NODENAME $SLURM_PROCID $SLURM_LOCALID ${CUDA_VISIBLE_DEVICES:-none} $3"'
        f" > {tmp_path}/rank.${{SLURM_RESTART_COUNT:-0}}.$SLURM_PROCID\n"
        '[ "${SLURM_RESTART_COUNT:-0}" = 0 ] && exit 75\nexit 0\n'
    )
    fake.chmod(0o755)
    proc = sh(
        "sbatch", "--parsable", "--output", tmp_path / "job.out", f"--nodelist={node}",
        "--cpus-per-task=1", "--time=5", f"--export=ALL,RLEF_PYTHON={fake}",
        REPO / "slurm" / "train_8b_1node.sh",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    assert wait_done(job, timeout=300) == "COMPLETED", (tmp_path / "job.out").read_text()
    for run in (0, 1):
        seen = [p.read_text().split() for p in tmp_path.glob(f"rank.{run}.*")]
        ranks = sorted((int(rank), int(local), n, d, c) for n, rank, local, d, c in seen)
        assert [r[:3] for r in ranks] == [(r, r, node) for r in range(8)], ranks
        devices = {r[3] for r in ranks}
        assert len(devices) == 1 and len(devices.pop().split(",")) == 8, ranks
        assert {r[4] for r in ranks} == {"configs/llama3_8b_1node.yaml"}, ranks
    log = (tmp_path / "job.out").read_text()
    assert f"stopped cleanly (exit 75): requeueing job {job}" in log, log


@pytest.mark.slurm
@pytest.mark.multiprocess
def test_the_demo_trains_tp2_on_two_nodes_with_its_rollout_worker_on_a_third(slurm, tmp_path):
    """sbatch slurm/train_demo.sh on 3 nodes, disaggregated: the trainer TP2 x DP2, a
    tensor-parallel pair on each of the first two nodes, the rollout worker on the third; it
    trains, and accounting shows each step where the layout put it."""
    from rlef_hpc.dist_env import expand_hostlist

    nodes = cluster_nodes(3)[:3]
    run = tmp_path / "run"
    proc = sh(
        "sbatch", "--wait", "--output", tmp_path / "job.out", f"--nodelist={','.join(nodes)}",
        "--nodes=3", "--export=ALL,LAYOUT=disaggregated", REPO / "slurm" / "train_demo.sh",
        *TINY, "model.num_query_groups=2", "parallel.tensor=2", "parallel.data=2",
        f"run.dir={run}", "run.iterations=2", timeout=900,
    )  # fmt: skip
    log = (tmp_path / "job.out").read_text()
    assert proc.returncode == 0, proc.stderr + log[-3000:]
    assert train_iterations(run) == [1, 2]
    assert (run / "latest").read_text().strip() == "2"
    job = proc.stdout.split()[-1]
    steps = steps_by_tasks(job)
    (trainer,) = steps[4]
    assert expand_hostlist(trainer) == nodes[:2], steps
    assert steps[1] == [nodes[2]], steps  # the rollout worker


@pytest.mark.slurm
@pytest.mark.multiprocess
def test_a_trainer_step_whose_tp_group_would_span_nodes_refuses_to_start(slurm, tmp_path):
    """The sbatch path's backstop (tools/submit.py refuses such a config before submitting):
    one task on each of two nodes at parallel.tensor=2 exits 2, one line each, having written
    nothing."""
    first, second = cluster_nodes(2)[:2]
    proc = sh(
        "srun", f"--nodelist={first},{second}", "--nodes=2", "--ntasks-per-node=1",
        "--mem=1G", "--time=5", "env", f"PYTHONPATH={REPO}", sys.executable, "-m",
        "rlef_hpc.train.cli", REPO / "configs" / "demo_cpu.yaml", *TINY,
        "model.num_query_groups=2", "parallel.tensor=2", "rollout.layout=disaggregated",
        f"run.dir={tmp_path / 'run'}", timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = "error: parallel.tensor=2 does not divide this step's tasks a node"
    assert proc.stderr.count(line) == 2, proc.stderr
    assert not (tmp_path / "run").exists()


def test_a_tensor_parallel_group_across_nodes_is_refused_before_submission(tmp_path):
    """No cluster needed: TP2 with one trainer task on each of two nodes (CPU), or TP8 on nodes
    of 4 GPUs, is refused by tools/submit.py (dry run too) and tools/plan.py: exit 2, one line
    naming the fields."""
    from rlef_hpc.dist_env import tasks_per_node, tensor_group_straddles

    demo = REPO / "configs" / "demo_cpu.yaml"
    cpu = [demo, "model.num_query_groups=2", "parallel.tensor=2", "slurm.nodes=2"]
    cpu += ["rollout.layout=disaggregated", f"run.dir={tmp_path / 'run'}"]
    gpu = [REPO / "configs" / "llama3_70b.yaml", "slurm.gpus_per_node=4", "slurm.nodes=256"]
    for args, fields in (
        (cpu, ("parallel.tensor=2", "1 trainer tasks a node", "slurm.nodes=2")),
        (gpu, ("parallel.tensor=8", "slurm.gpus_per_node=4")),
    ):
        for tool, extra in (("submit.py", []), ("submit.py", ["--dry-run"]), ("plan.py", [])):
            proc = run_tool(tool, *args, *extra)
            assert proc.returncode == 2 and proc.stdout == "", (tool, proc.stdout)
            assert proc.stderr.count("\n") == 1 and "within one node" in proc.stderr, proc.stderr
            assert all(f in proc.stderr for f in fields), proc.stderr
    assert not (tmp_path / "run").exists()
    # Two trainer tasks a node is the same run, allowed (DP across the nodes).
    ok = run_tool("submit.py", *cpu, "parallel.data=2", "--dry-run", "--job", "train")
    assert ok.returncode == 0, ok.stderr
    assert "#SBATCH --nodes=2\n" in ok.stdout and "#SBATCH --ntasks-per-node=2\n" in ok.stdout
    # srun's side (the sbatch scripts): a step's tasks a node, as Slurm writes them.
    assert tasks_per_node("2(x3),1") == [2, 2, 2, 1] and tasks_per_node("8") == [8]
    for spec, straddles in (("1(x2)", True), ("2(x2)", False), ("3", False), ("4,2", False)):
        env = {"SLURM_STEP_TASKS_PER_NODE": spec}
        assert bool(tensor_group_straddles(env, 2)) is straddles, spec
