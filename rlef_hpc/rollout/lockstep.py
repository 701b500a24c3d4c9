"""One colocated engine over a tensor-parallel group of training processes: its ranks issue the
same engine calls, in the same order, with the same sampling state.

Under vLLM's external_launcher every process of the group runs its own copy of the engine's
scheduler, and the copies stay in step only if each is given the same requests (vLLM:
"all the ranks in the same DP group should generate simultaneously ... otherwise it will
cause deadlock", vllm/distributed/parallel_state.py initialize_model_parallel) and samples
the same tokens. Episodes cannot simply run on every rank: their prompts depend on the
sandbox's verdicts, and a program near its time limit can pass on one rank and time out on
another. So the group's first rank (the leader) runs the episodes; each engine call it makes
is first sent to the other ranks (prompts, sampling options and the leader's CPU generator
state, which sampling draws from: rlef_hpc.rollout.vllm_engine), which make the same call
(`follow`) until the leader releases them; then the leader's trajectories are shared.
A group of one process (tensor parallelism 1) is its own leader, and nothing is sent.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from rlef_hpc.dist_env import host_group
from rlef_hpc.episodes.runner import Generation


def clear_stale_cpu_shm(shm_dir: Path = Path("/dev/shm")) -> list[str]:
    """Removes the shared-memory segments of vLLM CPU engines at TP > 1 that no live process
    maps; returns their names. vLLM's CPU tensor-parallel communicator names its segments
    after the group's ranks only ("...-tp:0-[0-1]-cpushm_0": vllm/distributed/
    device_communicators/cpu_communicator.py, _CPUSHMDistributed.make_group_name, from
    VLLM_DIST_IDENT, which external_launcher's env:// leaves the same for every run) and
    unlinks them only when the process exits normally. A rank killed instead (torchrun and srun
    end the others once one exits, as every rank of a stopped run does with 75) leaves them,
    and the next start of the same ranks on that machine fails ("create shm in SHMManager
    failed. errno: 17"). Run it before any engine of the job starts: a segment just created is
    not yet mapped."""
    segments = list(shm_dir.glob("*cpushm*"))
    if not segments:
        return []
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # gone, or not ours to read
            continue
        mapped.update(s for s in segments if str(s) in text)
    removed = []
    for segment in segments:
        if segment not in mapped:
            try:
                segment.unlink()
                removed.append(segment.name)
            except OSError:
                pass
    return removed


class LeaderFailed(RuntimeError):
    """The group's leader stopped with an error while its engine's other ranks followed it."""


def tensor_host_group(group: Any, timeout: timedelta | None = None) -> Any:
    """A gloo group over the ranks of `group` (the trainer's tensor-parallel group, NCCL on
    GPUs), for the objects the ranks exchange on the host; None where `group` has one rank.
    Collective over every rank: each builds every such group, in the same order."""
    if dist.get_world_size(group) == 1:
        return None
    mine = tuple(dist.get_process_group_ranks(group))
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine, group=host_group())
    result = None
    for ranks in sorted(set(everyone)):
        made = dist.new_group(list(ranks), backend="gloo", timeout=timeout)
        if ranks == mine:
            result = made
    return result


class EngineGroup:
    """This process's share of an engine: `engine` (a VLLMGenerator) and the gloo group of
    the processes that run it with this one (None: this process alone)."""

    def __init__(self, engine: Any, group: Any) -> None:
        self.engine, self.group = engine, group
        self.leader = group is None or dist.get_rank(group) == 0
        self.leader_rank = None if group is None else dist.get_global_rank(group, 0)

    def _broadcast(self, message: Any) -> Any:
        if self.group is None:
            return message
        box = [message]
        dist.broadcast_object_list(box, src=self.leader_rank, group=self.group)
        return box[0]

    def generate(
        self, prompts: list[list[int]], temperature: float, top_p: float
    ) -> list[Generation]:
        """The leader's engine call, made by every rank of the group."""
        self._broadcast(("generate", prompts, temperature, top_p, torch.get_rng_state()))
        return self.engine(prompts, temperature=temperature, top_p=top_p)

    def follow(self) -> None:
        """The other ranks: the leader's engine calls, until it releases them."""
        while True:
            message = self._broadcast(None)
            if message[0] == "done":
                return
            if message[0] == "failed":
                raise LeaderFailed(
                    f"rank {self.leader_rank}, which ran this engine's episodes, failed"
                )
            _, prompts, temperature, top_p, state = message
            torch.set_rng_state(state)  # sampling draws what the leader's draws
            self.engine(prompts, temperature=temperature, top_p=top_p)

    def release(self, failed: bool = False) -> None:
        """The leader: no more engine calls for now (`failed`: it stopped on an error)."""
        self._broadcast(("failed",) if failed else ("done",))

    def share(self, value: Any) -> Any:
        """The leader's `value`, on every rank of the group."""
        return self._broadcast(value)

    def sequence_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """The engine's log-probs of `sequences` (the same on every rank: the refit probe),
        called by every rank at once, from the leader's sampling state."""
        state = self._broadcast(torch.get_rng_state())
        torch.set_rng_state(state)
        return self.engine.sequence_logprobs(sequences)
