"""torch.distributed's rendezvous from the launcher's environment: torchrun sets RANK and
friends itself; under `srun` every task gets SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID and
the job's node list instead. The rendezvous is then the job's first node, on a port derived
from the job id (two jobs sharing a node do not collide; a requeued job reuses its own).

Where tensors live is decided here once, at start-up: `device()` is this process's accelerator
(what models and the NCCL groups take), `host_group()` a gloo group over every rank for what
stays on the host (metric dictionaries, stop flags, pickled objects): NCCL refuses CPU
tensors, and copying a flag to the GPU to agree on it would only add a device sync."""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

_device: torch.device | None = None
_host_group: Any = None


def expand_hostlist(hostlist: str) -> list[str]:
    """Slurm's compressed host list ("gpu[001-003,007],login1") as host names."""
    hosts: list[str] = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", hostlist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                hosts.append(prefix + lo)
                continue
            hosts += [f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1)]
    return hosts


def rendezvous_port(job_id: str) -> int:
    """The job's torch.distributed port, the same for a requeued job: below Linux's ephemeral
    range (32768-60999), from which srun and every outgoing connection take theirs."""
    return 20000 + int(re.sub(r"\D", "", job_id) or 0) % 12000


def torch_env_from_slurm(env: Mapping[str, str]) -> dict[str, str]:
    """torch.distributed's environment for this srun task ({} outside a Slurm step)."""
    if "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env:
        return {}
    job = env.get("SLURM_JOB_ID", "0")
    nodes = expand_hostlist(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "")))
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env["SLURM_NTASKS"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": env.get("MASTER_ADDR") or (nodes[0] if nodes else "127.0.0.1"),
        "MASTER_PORT": env.get("MASTER_PORT") or str(rendezvous_port(job)),
    }


def rendezvous(env: Mapping[str, str]) -> dict[str, str]:
    """This process's torch.distributed rendezvous (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT): torchrun's variables, else srun's (torch_env_from_slurm), else a one-process
    group's on loopback (MASTER_ADDR and MASTER_PORT where set, say by a test)."""
    if "RANK" in env:
        missing = [k for k in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in env]
        if missing:
            raise ValueError(f"RANK is set but not {', '.join(missing)}: a launcher's rendezvous")
        keys = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        return {k: env[k] for k in keys} | {"LOCAL_RANK": env.get("LOCAL_RANK", "0")}
    return torch_env_from_slurm(env) or {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": env.get("MASTER_ADDR", "127.0.0.1"),
        "MASTER_PORT": env.get("MASTER_PORT") or str(29500 + os.getpid() % 1000),
    }


def cuda_device_index(local_rank: int, visible: int) -> int:
    """The CUDA device this task uses among the `visible` ones. A task that sees all of its
    node's GPUs (srun's default, torchrun) takes the one at its LOCAL_RANK; a task bound to its
    own (--gpus-per-task, CUDA_VISIBLE_DEVICES of one device) sees fewer than LOCAL_RANK + 1
    and takes its share of them: with one visible, index 0."""
    if visible < 1:
        raise ValueError(f"no visible CUDA device (local rank {local_rank})")
    return local_rank % visible


def missing_gpus(env: Mapping[str, str], cuda_devices: int) -> str | None:
    """Why this process must not start, when Slurm gave its job GPUs (SLURM_GPUS_ON_NODE, set
    in the batch script, its steps and submitit's jobs alike) but torch sees none: it would
    otherwise train or generate on the CPU, hours later and slower, without saying so."""
    asked = env.get("SLURM_GPUS_ON_NODE", "0")
    if asked.isdigit() and int(asked) > 0 and cuda_devices == 0:
        return (
            f"error: the job asked for GPUs (SLURM_GPUS_ON_NODE={asked}) but CUDA sees none "
            "here (a CPU-only torch, or no driver): refusing to run on the CPU"
        )
    return None


def require_gpus_where_asked() -> None:
    """Exits with status 2 and one line (missing_gpus) where the job's GPUs are not usable."""
    import torch

    problem = missing_gpus(os.environ, torch.cuda.device_count())
    if problem:
        print(problem, file=sys.stderr)
        sys.exit(2)


def engine_gpu_hidden(env: Mapping[str, str], cuda_devices: int) -> str | None:
    """Why this task's colocated vLLM engine would not find its GPU, or None. Under
    torchrun/srun vLLM's external_launcher takes cuda:LOCAL_RANK (vllm/v1/worker/gpu_worker.py,
    Worker.init_device), so each task must see all of its node's GPUs (srun's default with the
    job's --gpus-per-node, and torchrun's), not only its own (--gpus-per-task, or
    CUDA_VISIBLE_DEVICES of one device)."""
    local = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", "0")))
    if cuda_devices == 0 or local < cuda_devices:
        return None
    return (
        f"error: rollout.layout=colocated: local rank {local} sees {cuda_devices} GPU(s), but "
        f"its vLLM engine takes cuda:{local}: give every task all of its node's GPUs (the "
        "job's --gpus-per-node, no --gpus-per-task)"
    )


def require_engine_gpu_visible() -> None:
    """Exits with status 2 and one line (engine_gpu_hidden) where a colocated engine would
    miss its GPU."""
    import torch

    problem = engine_gpu_hidden(os.environ, torch.cuda.device_count())
    if problem:
        print(problem, file=sys.stderr)
        sys.exit(2)


def local_world_size(env: Mapping[str, str]) -> int:
    """How many processes of the job run on this node: torchrun's LOCAL_WORLD_SIZE, else this
    node's count in srun's SLURM_STEP_TASKS_PER_NODE, else 1."""
    if "LOCAL_WORLD_SIZE" in env:
        return int(env["LOCAL_WORLD_SIZE"])
    counts = tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE", ""))
    node = int(env.get("SLURM_NODEID", "0"))
    return counts[node] if node < len(counts) else 1


def tasks_per_node(spec: str) -> list[int]:
    """Slurm's tasks-a-node list ("2(x3),1", SLURM_STEP_TASKS_PER_NODE) as [2, 2, 2, 1]."""
    counts: list[int] = []
    for count, repeat in re.findall(r"(\d+)(?:\(x(\d+)\))?", spec):
        counts += [int(count)] * int(repeat or 1)
    return counts


def tensor_group_straddles(env: Mapping[str, str], tensor: int) -> str | None:
    """Why this srun step's tensor-parallel groups would span nodes, or None. Megatron puts
    `tensor` consecutive ranks in a group and srun numbers a step's tasks node by node (block
    distribution, slurm/lib.sh), so a group sits within one node exactly when `tensor` divides
    every node's task count. Only a step of several nodes can straddle; outside srun, None."""
    counts = tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE", ""))
    if tensor <= 1 or len(counts) < 2 or all(c % tensor == 0 for c in counts):
        return None
    return (
        f"error: parallel.tensor={tensor} does not divide this step's tasks a node "
        f"(SLURM_STEP_TASKS_PER_NODE={env['SLURM_STEP_TASKS_PER_NODE']}): a tensor-parallel "
        "group would straddle nodes; run tensor x k tasks a node (--ntasks-per-node)"
    )


def require_tensor_groups_within_nodes(tensor: int) -> None:
    """Exits with status 2 and one line (tensor_group_straddles) where this srun step's
    tensor-parallel groups would span nodes."""
    problem = tensor_group_straddles(os.environ, tensor)
    if problem:
        print(problem, file=sys.stderr)
        sys.exit(2)


def launched_world_size(env: Mapping[str, str]) -> int:
    """How many processes the launcher started: torchrun's WORLD_SIZE, srun's task count, else
    1 (a plain process)."""
    return int(env.get("WORLD_SIZE") or torch_env_from_slurm(env).get("WORLD_SIZE") or 1)


def world_size_mismatch(processes: int, tensor: int, pipeline: int, world_size: int) -> str | None:
    """Why `processes` cannot run a layout of `world_size` = tensor x pipeline x data, or None."""
    if processes == world_size:
        return None
    return (
        f"{processes} processes, but parallel.tensor x pipeline x data = {world_size}: "
        f"set parallel.data={max(1, processes // (tensor * pipeline))}"
    )


def require_world_size(tensor: int, pipeline: int, world_size: int) -> None:
    """Exits with status 2 and one line (world_size_mismatch) where the launcher started
    another number of processes than the layout needs: said before the rendezvous."""
    problem = world_size_mismatch(launched_world_size(os.environ), tensor, pipeline, world_size)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)


def init_process_groups(
    tensor: int = 1,
    pipeline: int = 1,
    world_size: int | None = None,
    timeout_s: float | None = None,
) -> None:
    """torch.distributed (NCCL where CUDA exists, else gloo) from torchrun's or srun's
    environment, or a one-process group when neither launched us; megatron's parallel state
    (`tensor` x `pipeline` model parallelism, data parallelism over the rest) on top.
    Idempotent. `world_size`: the number of processes the config expects (checked).
    `timeout_s`: how long a collective may wait for the slowest rank (both groups; torch's
    default, 10 minutes for NCCL, when None)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    require_gpus_where_asked()
    require_tensor_groups_within_nodes(tensor)
    timeout = timedelta(seconds=timeout_s) if timeout_s is not None else None
    if not dist.is_initialized():
        # Passed, not put in the environment: what a launcher set stays as it set it.
        r = rendezvous(os.environ)
        if torch.cuda.is_available():  # one GPU per task: srun and torchrun start 8 a node
            local_rank = int(r["LOCAL_RANK"])
            torch.cuda.set_device(cuda_device_index(local_rank, torch.cuda.device_count()))
        dist.init_process_group(
            "nccl" if torch.cuda.is_available() else "gloo",
            init_method=f"tcp://{r['MASTER_ADDR']}:{r['MASTER_PORT']}",
            rank=int(r["RANK"]),
            world_size=int(r["WORLD_SIZE"]),
            timeout=timeout,
        )
    global _device, _host_group
    _device = None  # the current CUDA device may have been set just now
    if _host_group is None and not _default_group_takes_cpu():
        # collective: every rank, same order
        _host_group = dist.new_group(backend="gloo", timeout=timeout)
    if world_size is not None:
        problem = world_size_mismatch(dist.get_world_size(), tensor, pipeline, world_size)
        if problem:
            raise ValueError(problem)
    if not ps.model_parallel_is_initialized():
        # megatron's groups (its own default: 30 minutes) wait as long as the default one
        minutes = {"distributed_timeout_minutes": math.ceil(timeout_s / 60)} if timeout_s else {}
        ps.initialize_model_parallel(tensor, pipeline, **minutes)


def _default_group_takes_cpu() -> bool:
    import torch.distributed as dist

    return "gloo" in str(dist.get_backend())


def device() -> torch.device:
    """This process's compute device: the current CUDA device where CUDA exists, else the CPU.
    Model inputs and tensors reduced over the model's (NCCL) groups are made here."""
    import torch

    global _device
    if _device is None:
        cuda = torch.cuda.is_available()
        _device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return _device


def host_group() -> Any:
    """The gloo group over every rank, for CPU tensors and objects: the default group where it
    is gloo already (CPU runs, and test workers that set up gloo themselves), else the one
    `init_process_groups` made beside NCCL."""
    import torch.distributed as dist

    if _host_group is not None:
        return _host_group
    if _default_group_takes_cpu():
        return dist.group.WORLD
    # Making it here would be a collective that only some code paths reach: a hang.
    raise RuntimeError(
        f"no gloo group beside the default {dist.get_backend()} one: "
        "set up torch.distributed with rlef_hpc.dist_env.init_process_groups"
    )


def sum_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each value summed over every rank (collective, over the host group: a few floats)."""
    import torch
    import torch.distributed as dist

    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device="cpu")
    dist.all_reduce(t, group=host_group())
    return dict(zip(keys, t.tolist(), strict=True))


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over every rank (collective, over the host group: a few floats)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    return {k: v / world for k, v in sum_over_ranks(values).items()}
