"""torch.distributed's rendezvous from the launcher's environment: torchrun sets RANK and
friends itself; under `srun` every task gets SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID and
the job's node list instead. The rendezvous is then the job's first node, on a port derived
from the job id (two jobs sharing a node do not collide; a requeued job reuses its own)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping


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
    return 20000 + int(re.sub(r"\D", "", job_id) or 0) % 20000


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


def adopt_slurm_env() -> bool:
    """Fill torch.distributed's variables from Slurm's when a launcher has not (srun without
    torchrun). Returns whether it did."""
    if "RANK" in os.environ:
        return False
    found = torch_env_from_slurm(os.environ)
    os.environ.update(found)
    return bool(found)


def init_process_groups(tensor: int = 1, pipeline: int = 1, world_size: int | None = None) -> None:
    """torch.distributed (NCCL where CUDA exists, else gloo) from torchrun's or srun's
    environment, or a one-process group when neither launched us; megatron's parallel state
    (`tensor` x `pipeline` model parallelism, data parallelism over the rest) on top.
    Idempotent. `world_size`: the number of processes the config expects (checked)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        adopt_slurm_env()
        if "RANK" not in os.environ:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        if torch.cuda.is_available():  # one GPU per task: srun and torchrun start 8 a node
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if world_size is not None and dist.get_world_size() != world_size:
        raise ValueError(
            f"{dist.get_world_size()} processes, but parallel.tensor x pipeline x data = "
            f"{world_size}: set parallel.data={dist.get_world_size() // (tensor * pipeline)}"
        )
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor, pipeline)
