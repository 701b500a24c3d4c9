"""Each process that runs a sandbox on a node takes its own share of the node's CPUs when its
launcher left it unbound (torchrun, srun --cpu-bind=none), and keeps a binding it was given:
the Executor pins its workers to the process's first CPUs, and every unbound rank would pin
its workers to the same ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from rlef_hpc.sandbox.cpus import cgroup_cpus, cpu_share, parse_cpu_list, sandbox_share
from tests.helpers import require

REPO = Path(__file__).resolve().parents[1]


def test_unbound_processes_of_a_16_cpu_node_take_disjoint_shares_of_it():
    node = set(range(16))
    shares = [sandbox_share(node, node, i, 4) for i in range(4)]
    assert shares == [list(range(4 * i, 4 * i + 4)) for i in range(4)]
    # Colocated at TP 2 on 8 local ranks: the 4 leaders (local ranks 0, 2, 4, 6) take the
    # (local rank // 2)-th of 4 shares.
    assert sandbox_share(node, node, 6 // 2, 8 // 2) == [12, 13, 14, 15]
    # Fewer CPUs than processes: one each, spread over them.
    assert [sandbox_share({0, 1}, {0, 1}, i, 3) for i in range(3)] == [[0], [0], [1]]
    assert sandbox_share(node, node, 0, 1) == sorted(node)  # alone on the node


def test_a_process_already_bound_keeps_its_binding():
    node = set(range(16))
    assert sandbox_share({8, 9, 10, 11}, node, 1, 4) == [8, 9, 10, 11]  # srun --cpu-bind
    # The job's cpuset cgroup (Slurm's task/cgroup) is everything the job may use: processes
    # that have all of it are unbound, and share it.
    job = set(range(8, 16))
    assert sandbox_share(job, job, 1, 2) == [12, 13, 14, 15]


def test_cpu_lists_and_cgroups_are_read_as_the_kernel_writes_them(tmp_path):
    assert parse_cpu_list("0-3,8,10-11\n") == {0, 1, 2, 3, 8, 10, 11}
    assert cpu_share(list(range(96)), 1, 2) == list(range(48, 96))
    # cgroup v2: the process's cgroup does not enable cpuset; its parent's decides.
    v2 = tmp_path / "v2"
    (v2 / "slurm" / "job_7" / "step_0").mkdir(parents=True)
    (v2 / "slurm" / "job_7" / "cpuset.cpus.effective").write_text("4-7,12\n")
    (tmp_path / "cgroup2").write_text("0::/slurm/job_7/step_0\n")
    assert cgroup_cpus(tmp_path / "cgroup2", v2) == {4, 5, 6, 7, 12}
    # cgroup v1: the cpuset hierarchy's own file.
    v1 = tmp_path / "v1"
    (v1 / "cpuset" / "slurm" / "job_7").mkdir(parents=True)
    (v1 / "cpuset" / "slurm" / "job_7" / "cpuset.effective_cpus").write_text("0-1\n")
    (tmp_path / "cgroup1").write_text("4:memory:/x\n3:cpuset:/slurm/job_7\n0::/\n")
    assert cgroup_cpus(tmp_path / "cgroup1", v1) == {0, 1}
    assert cgroup_cpus(tmp_path / "missing", v1) is None


CHILD = """
import json, os
from rlef_hpc.sandbox import Executor
from rlef_hpc.sandbox.cpus import claim_sandbox_cpus
claim_sandbox_cpus()
with Executor(workers=2) as ex:
    print(json.dumps({"affinity": sorted(os.sched_getaffinity(0)), "workers": ex._cpus}))
"""


def test_two_local_ranks_with_the_same_cpus_pin_their_sandboxes_apart():
    """Two processes as torchrun starts them (LOCAL_RANK 0 and 1 of LOCAL_WORLD_SIZE 2, the
    same affinity): their sandbox workers end up on disjoint CPUs."""
    from rlef_hpc import sandbox

    require(sandbox.capabilities()["seccomp"], "seccomp filters are unavailable on this kernel")
    cpus = sorted(os.sched_getaffinity(0))
    require(len(cpus) >= 2, "needs two CPUs")
    got = []
    for rank in (0, 1):
        env = {**os.environ, "PYTHONPATH": str(REPO), "LOCAL_RANK": str(rank)}
        env.update(LOCAL_WORLD_SIZE="2")
        proc = subprocess.run(
            [sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=120
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        got.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert set(got[0]["affinity"]).isdisjoint(got[1]["affinity"])
    assert set(got[0]["workers"]).isdisjoint(got[1]["workers"])
    assert got == [
        {"affinity": s, "workers": [s[i % len(s)] for i in range(2)]}
        for s in (cpu_share(cpus, 0, 2), cpu_share(cpus, 1, 2))
    ]
