"""The optimizer and schedule of every trained model (the PPO update's policy and value, the
warm start's policy): megatron's DDP (contiguous gradient buffers reduced over data-parallel
ranks), its optimizer (AdamW; moments and master weights sharded over data-parallel ranks
unless configured otherwise) and its LR/WD schedule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rlef_hpc.config import require_at_least, require_positive
from rlef_hpc.models.gpt import Kernels, available_kernels


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and its schedule, for the policy and the value model alike."""

    lr: float = 2e-7
    weight_decay: float = 0.1
    warmup_steps: int = 50
    grad_clip: float = 1.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    # Adam's moments and fp32 master weights sharded over data-parallel ranks (ZeRO-1).
    distributed_optimizer: bool = True

    def __post_init__(self) -> None:
        # grad_clip 0: no clipping (megatron clips only above 0)
        require_at_least("optim", self, lr=0, weight_decay=0, warmup_steps=0, grad_clip=0)
        require_positive("optim", self, "eps")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must each be in [0, 1), got {self.betas}")


@dataclass
class Trainable:
    """A model being trained: megatron's DDP wrapper (contiguous gradient buffers, reduced over
    data-parallel ranks), its optimizer (AdamW; distributed or not) and LR/WD schedule."""

    model: Any
    optimizer: Any
    scheduler: Any

    @property
    def module(self) -> torch.nn.Module:
        return self.model.module

    def finish_grads(self) -> None:
        """After the backward passes: megatron's finalize_model_grads waits for (or does) the
        data-parallel reduction, and all-reduces over tensor-parallel ranks the gradients of
        parameters sequence parallelism computes from a slice of the sequence (the norms)."""
        from megatron.core.distributed import finalize_model_grads

        finalize_model_grads([self.model])

    def step(self, gather: bool = True) -> tuple[bool, float, Any]:
        """The optimizer step (its (success, grad norm, zeros) result). With
        overlap_param_gather the distributed optimizer leaves the updated parameters'
        all-gather to the next forward, where it overlaps with compute; refit, publishing and
        checkpoints read them before any forward, so `gather` finishes it here (False: the
        next thing to touch them is this model's forward)."""
        result = self.optimizer.step()
        if gather and self.model.ddp_config.overlap_param_gather:
            self.model.start_param_sync(force_sync=True)
        return result


def ddp_config(cfg: OptimConfig, kernels: Kernels) -> Any:
    """Megatron DDP's config: the data-parallel gradient reduce-scatter (all-reduce without
    the distributed optimizer) overlapped with backward, and the parameter all-gather with the
    next forward, on CUDA with Transformer Engine (NCCL on GPUs); synchronous elsewhere."""
    from megatron.core.distributed import DistributedDataParallelConfig

    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=cfg.distributed_optimizer,
        overlap_grad_reduce=kernels.te,
        overlap_param_gather=kernels.te and cfg.distributed_optimizer,
    )


def make_trainable(
    model: torch.nn.Module, cfg: OptimConfig, kernels: Kernels | None = None
) -> Trainable:
    """AdamW without weight decay on norms and biases, a linear warm-up to `lr` then constant,
    gradients clipped by their global norm."""
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    kernels = available_kernels() if kernels is None else kernels
    ddp = DistributedDataParallel(model.config, ddp_config(cfg, kernels), model)
    # Megatron's schedules run all micro-batches but the last inside no_sync: an overlapped
    # reduction starts once, when the last one's gradients are ready.
    model.config.no_sync_func = ddp.no_sync
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=cfg.lr,
            min_lr=0.0,
            weight_decay=cfg.weight_decay,
            adam_beta1=cfg.betas[0],
            adam_beta2=cfg.betas[1],
            adam_eps=cfg.eps,
            clip_grad=cfg.grad_clip,
            bf16=model.config.bf16,
            params_dtype=model.config.params_dtype,
            use_distributed_optimizer=cfg.distributed_optimizer,
        ),
        [ddp],
    )
    warmup = max(cfg.warmup_steps, 1)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=cfg.lr,
        min_lr=cfg.lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=warmup + 1,
        lr_decay_style="constant",
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=1,
        wd_incr_style="constant",
    )
    # Megatron's warm-up starts at init_lr (0) on step 0: one step ahead, the k-th update
    # (from 0) runs at lr * (k + 1) / warmup, and never at 0.
    scheduler.step(1)
    return Trainable(ddp, optimizer, scheduler)
