"""The launch layer's config: a training run plus the Slurm jobs it runs in.

configs/*.yaml carry a `slurm` group beside the training groups. tools/submit.py and
tools/plan.py read a file as JobConfig (TrainConfig and `slurm`, validated together);
rlef-train, inside those jobs, reads it as TrainConfig, which skips `slurm`
(TrainConfig.foreign_groups): train sits below launch and never imports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rlef_hpc.train.config import TrainConfig


@dataclass(frozen=True)
class SlurmConfig:
    """The jobs tools/submit.py asks Slurm for. Training takes parallel.world_size GPUs as
    `nodes` x `gpus_per_node` (one task per GPU; on CPU clusters, gpus_per_node=0 and one task
    per trainer rank); each disaggregated rollout worker takes rollout.tensor_parallel GPUs."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_minutes: int = 60
    nodes: int = 1
    gpus_per_node: int = 0
    gpu_memory_gb: float = 80.0  # per GPU, for the preflight memory plan (H100 80GB)
    # Per GPU, what neither the trainer nor a sleeping engine gives back (the CUDA context,
    # NCCL buffers, vLLM's CUDA graphs): the colocated plan's reserve, an assumption.
    gpu_reserve_gb: float = 3.0
    # What the plan prices a refit and an iteration with (tools/plan.py), in GB/s (1e9 B/s)
    # and TFLOP/s: one InfiniBand NDR port per GPU (400 Gb/s), a parallel filesystem's rate
    # to one node and in all (Lustre/GPFS class), an H100 SXM's dense bf16 peak, and the
    # share of it a Megatron trainer of this size reaches (model FLOPs utilisation).
    network_gbs: float = 50.0
    filesystem_node_gbs: float = 5.0
    filesystem_total_gbs: float = 100.0
    gpu_tflops: float = 989.0
    mfu: float = 0.35
    cpus_per_task: int = 1
    mem_gb: int = 4  # per node
    # Seconds before the time limit at which the trainer is told to checkpoint and requeue.
    signal_seconds: int = 120
    eval_after: bool = True  # an evaluation job, started when training succeeds
    max_requeues: int = 10


@dataclass(frozen=True)
class JobConfig(TrainConfig):
    """A run as tools/submit.py and tools/plan.py take it: the training config, and the Slurm
    jobs it runs in."""

    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    def validate(self) -> None:
        """TrainConfig.validate(), then the layout against the Slurm allocation; names the key."""
        super().validate()
        p, r, s = self.parallel, self.rollout, self.slurm
        if s.gpus_per_node and s.gpus_per_node % p.tensor:
            raise ValueError(
                f"parallel.tensor={p.tensor} does not divide slurm.gpus_per_node="
                f"{s.gpus_per_node}: a tensor-parallel group must sit within one node"
            )
        if s.gpus_per_node and p.world_size != s.nodes * s.gpus_per_node:
            raise ValueError(
                f"the layout does not fit the GPUs: parallel.tensor x pipeline x data = "
                f"{p.world_size}, but slurm.nodes={s.nodes} x slurm.gpus_per_node="
                f"{s.gpus_per_node} = {s.nodes * s.gpus_per_node}"
            )
        if s.gpus_per_node and r.tensor_parallel > s.gpus_per_node and r.layout != "colocated":
            raise ValueError(
                f"rollout.tensor_parallel={r.tensor_parallel} is more than one node's "
                f"slurm.gpus_per_node={s.gpus_per_node}"
            )
        if not s.gpus_per_node and p.world_size % s.nodes:
            raise ValueError(
                f"slurm.nodes={s.nodes} must divide the {p.world_size} trainer processes"
            )
        per_node = p.world_size // s.nodes
        if not s.gpus_per_node and per_node % p.tensor:
            raise ValueError(
                f"parallel.tensor={p.tensor} does not divide the {per_node} trainer tasks a "
                f"node (parallel.tensor x pipeline x data = {p.world_size} over slurm.nodes="
                f"{s.nodes}): a tensor-parallel group must sit within one node"
            )
