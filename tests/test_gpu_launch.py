"""The GPU launch path as far as a CPU machine reaches it: which CUDA device a task takes,
how long collectives wait, and a job that asked for GPUs refusing to run without CUDA (in
process, and under srun on the local cluster's stand-in GPUs)."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch

from rlef_hpc.config import load, to_dict
from rlef_hpc.dist_env import (
    cuda_device_index,
    engine_gpu_hidden,
    init_process_groups,
    missing_gpus,
)
from rlef_hpc.launch.config import JobConfig
from rlef_hpc.train.loop import collective_timeout_s
from tests.helpers import TESTS_DIR, require

REPO = TESTS_DIR.parent
REFUSAL = "error: the job asked for GPUs (SLURM_GPUS_ON_NODE=2) but CUDA sees none"


def test_a_task_takes_its_local_rank_among_all_gpus_or_its_own_bound_one():
    assert [cuda_device_index(r, 8) for r in range(8)] == list(range(8))  # sees the node's 8
    assert [cuda_device_index(r, 1) for r in range(8)] == [0] * 8  # bound to one device
    assert [cuda_device_index(r, 2) for r in (0, 1, 2, 3)] == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="no visible CUDA device"):
        cuda_device_index(0, 0)


def test_gpus_asked_by_slurm_and_absent_are_refused():
    assert missing_gpus({"SLURM_GPUS_ON_NODE": "2"}, 0).startswith(REFUSAL)
    assert missing_gpus({"SLURM_GPUS_ON_NODE": "2"}, 2) is None
    assert missing_gpus({"SLURM_GPUS_ON_NODE": "0"}, 0) is None
    assert missing_gpus({}, 0) is None  # not a Slurm job, or one without GPUs: CPU runs


def test_a_colocated_engine_needs_its_tasks_to_see_the_nodes_gpus():
    """vLLM's external_launcher takes cuda:LOCAL_RANK: a task bound to its own GPU (1 visible)
    at local rank 3 would start its engine on a GPU it cannot see; refused in one line."""
    assert engine_gpu_hidden({"LOCAL_RANK": "3"}, 8) is None
    assert engine_gpu_hidden({"SLURM_LOCALID": "7"}, 8) is None  # srun without torchrun
    refusal = engine_gpu_hidden({"LOCAL_RANK": "3"}, 1)
    assert refusal.startswith("error: rollout.layout=colocated: local rank 3 sees 1 GPU(s)")
    assert "--gpus-per-node" in refusal and "\n" not in refusal
    assert engine_gpu_hidden({"SLURM_LOCALID": "1"}, 1) is not None
    assert engine_gpu_hidden({"LOCAL_RANK": "3"}, 0) is None  # no CUDA: a CPU engine


def test_each_engine_leader_on_a_node_takes_its_own_share_of_the_cpus():
    """The one-node layout's two leaders (local ranks 0 and 4 at TP 4) pin their sandbox
    workers to disjoint halves of the node's CPUs, not both to the first ones
    (rlef_hpc.sandbox.cpus; tests/test_sandbox_cpus.py for the rest)."""
    from rlef_hpc.dist_env import local_world_size
    from rlef_hpc.sandbox.cpus import cpu_share

    cpus = list(range(96))
    assert cpu_share(cpus, 0, 2) == list(range(48)) and cpu_share(cpus, 1, 2) == cpus[48:]
    assert cpu_share([0, 1], 1, 2) == [1] and cpu_share([0], 1, 2) == [0]  # fewer than shares
    assert local_world_size({"LOCAL_WORLD_SIZE": "8"}) == 8  # torchrun
    srun = {"SLURM_STEP_TASKS_PER_NODE": "8(x2),4", "SLURM_NODEID": "2"}
    assert local_world_size(srun) == 4 and local_world_size({}) == 1
    # In a process of its own: the second leader of two (local rank 2 at TP 2) keeps the
    # second half of its CPUs.
    import os
    import subprocess
    import sys

    code = (
        "import os; from rlef_hpc.sandbox.cpus import claim_sandbox_cpus; "
        "claim_sandbox_cpus(2, {'LOCAL_RANK': '2', 'LOCAL_WORLD_SIZE': '4'}); "
        "print(sorted(os.sched_getaffinity(0)))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(cpu_share(sorted(os.sched_getaffinity(0)), 1, 2))


def demo(*overrides: str) -> JobConfig:
    return load(JobConfig, REPO / "configs" / "demo_cpu.yaml", list(overrides))


def test_collectives_wait_longer_than_rank_0_waits_for_shards():
    assert collective_timeout_s(demo()) == 3600 + 600  # rollout.shard_timeout_s by default
    assert collective_timeout_s(demo("rollout.shard_timeout_s=7200")) == 7200 + 600
    # A short shard timeout still leaves rank 0 time to save and publish alone.
    assert collective_timeout_s(demo("rollout.shard_timeout_s=60")) == 1800 + 600


def test_init_process_groups_gives_the_timeout_to_torch_distributed(monkeypatch):
    import torch.distributed as dist

    class Stop(Exception):
        pass

    seen = {}

    def init_process_group(backend: str, timeout: timedelta | None = None, **rendezvous) -> None:
        seen.update(backend=backend, timeout=timeout, **rendezvous)
        raise Stop

    monkeypatch.delenv("SLURM_GPUS_ON_NODE", raising=False)
    launcher = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="h", MASTER_PORT="7")
    for key, value in launcher.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    with pytest.raises(Stop):
        init_process_groups(1, 1, 1, timeout_s=4200.0)
    assert seen["timeout"] == timedelta(seconds=4200)
    assert seen["init_method"] == "tcp://h:7" and (seen["rank"], seen["world_size"]) == (0, 1)


@pytest.mark.parametrize("job", ["train", "rollout"])
def test_a_launch_job_that_asked_for_gpus_refuses_to_run_without_cuda(
    job, monkeypatch, capsys, tmp_path
):
    from rlef_hpc.launch.jobs import RolloutJob, TrainJob

    require(not torch.cuda.is_available(), "CUDA is here: the refusal is for machines without")
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "2")
    config = to_dict(demo(f"run.dir={tmp_path / 'run'}"))
    with pytest.raises(SystemExit) as stop:
        TrainJob(config)() if job == "train" else RolloutJob(config, 0)()
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(REFUSAL) and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()
