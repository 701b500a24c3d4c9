"""Which CPUs a process's sandbox workers take: its share of the node's, when several processes
on the node run sandboxes.

The Executor pins worker i to the i-th of the process's CPUs (rlef_hpc/sandbox/executor.py).
Processes started by torchrun, or by srun --cpu-bind=none (the trainer's step: slurm/lib.sh),
all have every CPU the job has on the node, so every one of them would pin its workers to the
same first CPUs while the rest idle. `claim_sandbox_cpus` cuts an unbound process's CPUs to its
share (by its local rank among the node's processes that run a sandbox) before its Executor
starts; a process already bound to fewer (srun --cpu-bind, a launcher's binding) keeps them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from rlef_hpc.dist_env import local_world_size


def parse_cpu_list(text: str) -> set[int]:
    """The kernel's CPU list format ("0-3,8,10-11") as a set."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def cgroup_cpus(
    proc: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")
) -> set[int] | None:
    """The CPUs this process's cpuset cgroup allows (what the job was given: Slurm's
    task/cgroup), v2 or v1; None where there is no such cgroup to read."""
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        return None
    candidates = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: the controller's files are in the unified tree
            candidates.append((root / path.lstrip("/"), "cpuset.cpus.effective"))
        elif "cpuset" in controllers.split(","):
            candidates.append((root / "cpuset" / path.lstrip("/"), "cpuset.effective_cpus"))
    for directory, name in candidates:
        # Where this cgroup does not enable cpuset, its nearest ancestor that does decides.
        for d in (directory, *directory.parents):
            if d == root.parent:
                break
            try:
                return parse_cpu_list((d / name).read_text()) or None
            except (OSError, ValueError):
                continue
    return None


def allowed_cpus() -> set[int]:
    """Every CPU a process of this job may run on: its cpuset cgroup's, else the node's."""
    cpus = cgroup_cpus()
    if cpus is not None:
        return cpus
    try:
        return parse_cpu_list(Path("/sys/devices/system/cpu/online").read_text())
    except OSError:
        return set(range(os.cpu_count() or 1))


def cpu_share(cpus: list[int], index: int, count: int) -> list[int]:
    """The `index`-th of `count` contiguous, nearly equal shares of `cpus` (where there are
    fewer CPUs than shares, one CPU each, spread over them)."""
    share = cpus[index * len(cpus) // count : (index + 1) * len(cpus) // count]
    return share or [cpus[index * len(cpus) // count]]


def sandbox_share(affinity: set[int], allowed: set[int], index: int, count: int) -> list[int]:
    """The CPUs of the `index`-th of `count` sandbox-running processes on a node whose current
    CPUs are `affinity`: its share of them where they are every CPU `allowed` (unbound: its
    neighbours have the same), else `affinity` as it is (bound already: respected)."""
    cpus = sorted(affinity)
    if count <= 1 or not allowed <= affinity:
        return cpus
    return cpu_share(cpus, index, count)


def claim_sandbox_cpus(every: int = 1, env: Mapping[str, str] = os.environ) -> list[int]:
    """Cuts this process's CPUs to its sandbox's share of the node's (see the module) and
    returns them. Every `every`-th local rank runs a sandbox (the leaders of colocated
    tensor-parallel groups of `every` ranks: rlef_hpc.rollout.lockstep); this process is the
    (local rank // every)-th of them. Call before the Executor starts, in a process that runs
    episodes; its threads started later (the sandbox's, the engine's) inherit the CPUs."""
    local = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", "0")))
    count = max(1, local_world_size(env) // every)
    affinity = os.sched_getaffinity(0)
    share = sandbox_share(affinity, allowed_cpus(), local // every, count)
    if set(share) != affinity:
        os.sched_setaffinity(0, share)
    return share
