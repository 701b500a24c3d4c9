"""Megatron GPTModel parameters: this rank's shard <-> the full tensor, and local <-> global
names. Used to load and compare weights across TP x PP layouts (and, later, by export,
import and refit, so that the layout rules exist once).

- Tensor-parallel weights carry `partition_dim`; a shard is a contiguous chunk along it. For
  fused QKV that is exactly a block of query groups, since megatron stores QKV group-major.
- linear_fc1 of a gated MLP is [gate; up]: each rank holds [gate_shard; up_shard].
- Everything else (norms, the value head) is replicated.
- Layer numbers are local to a pipeline stage; global = local + stage * layers per stage.
- Full states are named as megatron's local spec names parameters (rlef_hpc.checkpoint.hf.
  local_name), whichever spec built the model: Transformer Engine's fuses the norms.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist

from rlef_hpc.checkpoint.hf import local_name

_LAYER = re.compile(r"^(decoder\.layers\.)(\d+)(\..*)$")


def global_name(name: str, stage: int, layers_per_stage: int) -> str:
    """The name in a full state: global layer number, the local spec's name."""
    m = _LAYER.match(name)
    return local_name(f"{m[1]}{int(m[2]) + stage * layers_per_stage}{m[3]}" if m else name)


def _gated(name: str, param: torch.Tensor) -> bool:
    # the weight alone: TE's linear_fc1 also holds the (replicated) fused norm
    return name.endswith("linear_fc1.weight") and getattr(param, "partition_dim", None) == 0


def shard_of(
    name: str, param: torch.Tensor, full: torch.Tensor, tp_rank: int, tp: int
) -> torch.Tensor:
    """This rank's part of `full` for parameter `param` named `name`."""
    if not getattr(param, "tensor_model_parallel", False) or tp == 1:
        return full
    dim = param.partition_dim
    if _gated(name, param):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, 0)[tp_rank], up.chunk(tp, 0)[tp_rank]], 0)
    return full.chunk(tp, dim=dim)[tp_rank]


def full_of(
    name: str, param: torch.Tensor, group: dist.ProcessGroup | None, tp: int
) -> torch.Tensor:
    """The whole tensor, all-gathered over the tensor-parallel group (every rank gets it)."""
    data = param.detach()
    if not getattr(param, "tensor_model_parallel", False) or tp == 1:
        return data.clone()
    shards = [torch.empty_like(data) for _ in range(tp)]
    dist.all_gather(shards, data.contiguous(), group=group)
    if _gated(name, param):
        halves = [s.chunk(2, 0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], 0)
    return torch.cat(shards, dim=param.partition_dim)


def load_full_state(
    model: torch.nn.Module,
    full: dict[str, torch.Tensor],
    layers_per_stage: int,
    strict: bool = True,
) -> None:
    """Copies this rank's shards of a full (TP=1, PP=1, local spec named) state into `model`
    (either spec's); with
    strict=False, parameters the state lacks keep their initialisation (a new value head)."""
    from megatron.core import parallel_state as ps

    stage = ps.get_pipeline_model_parallel_rank()
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for name, param in model.named_parameters():
            key = global_name(name, stage, layers_per_stage)
            if key not in full:
                if strict:
                    raise KeyError(f"the state to load has no {key!r}")
                continue
            param.copy_(shard_of(name, param, full[key], tp_rank, tp))


def gather_full_state(model: torch.nn.Module, layers_per_stage: int) -> dict[str, torch.Tensor]:
    """This pipeline stage's parameters as full tensors with global (local spec) names."""
    from megatron.core import parallel_state as ps

    stage = ps.get_pipeline_model_parallel_rank()
    group, tp = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size()
    return {
        global_name(name, stage, layers_per_stage): full_of(name, param, group, tp)
        for name, param in model.named_parameters()
    }
