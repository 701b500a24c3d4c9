"""One model and its megatron optimizer as megatron's dist_checkpointing saves and loads
them: the formats of the optimizer's state, the bucket index, and the loads (parallel,
resharding, model space). rlef_hpc.checkpoint.training puts these in a run's checkpoints.

Formats (the content metadata's "optimizer_format"). With megatron's distributed optimizer
(DISTRIBUTED) its state (fp32 master weights and Adam moments, 12 bytes per parameter) is saved
in megatron's `dp_reshardable` format: every rank writes its own shard of the gradient buckets
as it holds it, in parallel, with no gather onto one rank (megatron's
FullyParallelSaveStrategyWrapper spreads the writes of tensors replicated over DP ranks, the
model's weights, over those ranks). Beside it go the layout (TP, PP, DP, the number of bucket
layouts) and, per bucket layout, an index of where each parameter (its global key and region)
lies in the buckets. On load that index is compared with the current one: unchanged (the same
TP x PP and bucket layout; DP may differ, which megatron's format reshards itself) ->
megatron's parallel load, each rank reading only its shard; changed -> a resharding load
(rlef_hpc.checkpoint.reshard plans it) that reads the regions of the saved buckets the rank's
parameters cover. Without it (MODEL_SPACE, optim.distributed_optimizer=false) the optimizer is
megatron's per-parameter one, whose sharded state has the parameters' global shapes: megatron
loads it at any layout. A checkpoint loads only into an optimizer of the format it was saved
with (CheckpointError otherwise).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from rlef_hpc.checkpoint import reshard
from rlef_hpc.checkpoint.convert import CheckpointError
from rlef_hpc.dist_env import host_group
from rlef_hpc.models import megatron_private

# The optimizer formats (content metadata "optimizer_format"; see the module doc).
DISTRIBUTED = "distributed"
MODEL_SPACE = "model_space"
# The distributed optimizer's state as each rank holds it (its shard of the gradient buckets),
# written by every rank in parallel: megatron 0.16.1's parallel format. (Its other parallel
# one, fully_sharded_model_space, cannot be saved: it builds ShardedTensors with a
# flattened_range, which 0.16.1's ShardedTensor rejects.) Reshardable by megatron over DP only.
_DP_RESHARDABLE = {"distrib_optim_sharding_type": "dp_reshardable"}
# Per bucket layout (megatron's data_parallel_group_idx: one per TP x PP rank), where each
# parameter's optimizer state lies in the saved buckets; read by the resharding load.
_INDEX_KEY = "rlef.optimizer_bucket_index.dp_group_idx_{}"


def _adams(optimizer: Any) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside a megatron (chained) optimizer."""
    return [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])]


def _distributed(optimizer: Any) -> Any:
    """The megatron DistributedOptimizer in `optimizer`, or None (not distributed, or chained:
    the DISTRIBUTED format is one distributed optimizer's)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    if len(inner) == 1 and isinstance(inner[0], DistributedOptimizer):
        return inner[0]
    return None


def format_of(optimizer: Any) -> str:
    return DISTRIBUTED if _distributed(optimizer) is not None else MODEL_SPACE


def _per_param_step(adam: torch.optim.Optimizer) -> bool:
    """Whether `adam` is torch's, which keeps a step count per parameter, the one the
    workarounds below are for. Transformer Engine's (and apex's) FusedAdam, megatron's choice
    where they exist, keeps one per group, which megatron handles, and rejects a
    per-parameter "step" in state_dict and load_state_dict."""
    return isinstance(adam, torch.optim.Adam | torch.optim.AdamW)


def _init_state(optimizer: Any) -> None:
    """torch Adam's state must exist before megatron builds a loading template from it: zero
    moments and one step count per parameter (overwritten by the load). Megatron initialises
    FusedAdam's itself."""
    for adam in _adams(optimizer):
        if not _per_param_step(adam):
            continue
        for group in adam.param_groups:
            for p in group["params"]:
                state = adam.state[p]
                if "step" not in state:
                    state["step"] = torch.zeros((), device="cpu")  # as torch.optim.Adam keeps it
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)


def _load_state(inner: Any, state: dict[str, Any], load_params: Callable[[], None]) -> None:
    """inner.load_state_dict(state) (megatron's non-parameter state: groups, steps), then
    load_params() (the parameter state), around two bugs of megatron-core 0.16.1's
    DistributedOptimizer with torch's Adam (no TE or apex): load_state_dict gives every
    parameter one shared `step` tensor (torch increments each parameter's step in place: a
    shared one would advance by the number of parameters per update), and the parameter
    state loaders then fail copying state that has no `step`. So the steps are taken out
    while the parameter state loads and come back one tensor per parameter."""
    inner.load_state_dict(state)
    # The loaders copy into the fp32 master weights, leaves that require grad; megatron's
    # dp_reshardable loader (unlike its model-space one) does not turn autograd off itself.
    load_params = torch.no_grad()(load_params)
    if not _per_param_step(inner.optimizer):
        load_params()
        return
    steps = {p: s.pop("step") for p, s in inner.optimizer.state.items() if "step" in s}
    load_params()
    for p, step in steps.items():
        inner.optimizer.state[p]["step"] = step.clone()


def _load_optimizer(optimizer: Any, state: dict[str, Any]) -> None:
    """optimizer.load_state_dict of a loaded megatron sharded state, with the torch Adam
    workarounds of _load_state for the distributed optimizer's parameter state. Other
    optimizers (TE's FusedAdam; any optimizer in MODEL_SPACE) load as megatron loads them."""
    inner = _distributed(optimizer)
    if inner is None or "param_state" not in state or not _per_param_step(inner.optimizer):
        optimizer.load_state_dict(state)
        return
    param_state = state.pop("param_state")
    state.pop("param_state_sharding_type")
    _load_state(inner, state, lambda: inner.load_parameter_state_from_dp_reshardable(param_state))


def _sharded(model: torch.nn.Module, optimizer: Any, is_loading: bool) -> dict[str, Any]:
    """The model's and its megatron optimizer's state as megatron sharded state, the
    optimizer's in its format (DISTRIBUTED: dp_reshardable; else megatron's own)."""
    model_state = model.sharded_state_dict()
    metadata = _DP_RESHARDABLE if format_of(optimizer) == DISTRIBUTED else None
    optim_state = optimizer.sharded_state_dict(
        model_state, is_loading=is_loading, metadata=metadata
    )
    return {"model": model_state, "optimizer": optim_state}


def _pieces(sharded: Any, param: torch.nn.Parameter) -> list[reshard.Wanted]:
    """Where `param`'s (TP-local) tensor lies in the global tensors it is saved as: one piece,
    or several where megatron saves it through a factory (the SwiGLU fc1 weight: its two
    halves are two TP-sharded tensors). Built on a meta tensor: no memory."""
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    data = torch.empty(param.shape, dtype=param.dtype, device="meta")
    if isinstance(sharded, ShardedTensorFactory):
        built = list(nested_values(replace(sharded, data=data).build()))
    else:
        built = [replace(sharded, data=data)]
    pieces = []
    for st in built:
        if not isinstance(st, ShardedTensor) or st.flattened_range is not None:
            raise CheckpointError(f"cannot index {sharded.key}: not a plain tensor ({st})")
        if not st.data.is_contiguous():
            raise CheckpointError(f"cannot index {st.key}: a non-contiguous part of a parameter")
        shape = (1,) * st.prepend_axis_num + tuple(st.local_shape)
        pieces.append(
            reshard.Wanted(st.key, tuple(st.global_offset), shape, st.data.storage_offset())
        )
    return pieces


def _by_param(model: torch.nn.Module) -> dict[torch.Tensor, Any]:
    """Each parameter's sharded tensor (or factory) in the model's sharded state."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories

    tensors, _ = extract_sharded_tensors_and_factories(model.sharded_state_dict())
    return {sh.data: sh for sh in nested_values(tensors)}


def _bucket_index(model: torch.nn.Module, inner: Any) -> list[dict[str, Any]]:
    """This rank's bucket layout (the same on every DP rank of its group): for each piece of
    each parameter (_pieces), the saved bucket tensor holding its optimizer state (megatron's
    dp_reshardable key, less the state's name), that tensor's length and where in it the
    piece starts, as plain dicts (reshard.Saved.of reads them)."""
    by_param = _by_param(model)
    index = []
    for gbuf_idx, ranges in enumerate(inner.gbuf_ranges):
        buffer = inner.buffers[gbuf_idx]
        (dtype,) = ranges.keys()
        for param, (start, _, bucket_idx) in buffer.param_index_map.items():
            bucket = buffer.buckets[bucket_idx]
            # megatron's key in sharded_param_state_dp_reshardable
            tensor = (
                f"optimizer.distributed.dp_group_idx_{inner.data_parallel_group_idx}"
                f".gbuf_idx_{gbuf_idx}.dtype_{dtype}.bucket_idx_{bucket_idx}"
            )
            for piece in _pieces(by_param[param], param):
                index.append(
                    {
                        "key": piece.key,
                        "offset": list(piece.offset),
                        "shape": list(piece.shape),
                        "tensor": tensor,
                        "length": bucket.numel_unpadded,
                        "start": start - bucket.offset + piece.first,
                    }
                )
    return index


def _layout(inner: Any) -> dict[str, int]:
    """The parallel layout a checkpoint is saved at (recorded for people and tools; the load
    decides by the bucket index, which is what the format depends on)."""
    from megatron.core import parallel_state as ps

    # A host-side count: over the gloo group (NCCL refuses CPU tensors).
    groups = torch.tensor(
        inner.data_parallel_group_idx + 1 if inner is not None else 1, device="cpu"
    )
    dist.all_reduce(groups, op=dist.ReduceOp.MAX, group=host_group())
    return {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
        "cp": ps.get_context_parallel_world_size(),
        "bucket_layouts": int(groups),
    }


def save_state(model: torch.nn.Module, optimizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The sharded state to save (the optimizer's format, with the bucket index where it is
    DISTRIBUTED) and the content metadata that describes it."""
    from megatron.core.dist_checkpointing import ShardedObject

    state = _sharded(model, optimizer, is_loading=False)
    inner = _distributed(optimizer)
    if inner is not None:
        # One copy per bucket layout, written by its DP rank 0.
        state["bucket_index"] = ShardedObject(
            _INDEX_KEY.format(inner.data_parallel_group_idx),
            _bucket_index(model, inner),
            (1,),
            (0,),
            replica_id=(
                inner.distributed_optimizer_instance_id,
                0,
                inner.data_parallel_group.rank(),
            ),
        )
    return state, {"optimizer_format": format_of(optimizer), "layout": _layout(inner)}


def save_strategy() -> Any:
    """torch_dist, with the writes of tensors replicated over DP ranks (the model's weights)
    spread over those ranks rather than all done by DP rank 0."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelSaveStrategyWrapper,
    )

    return FullyParallelSaveStrategyWrapper(
        get_default_save_sharded_strategy(),
        ps.get_data_parallel_group(with_context_parallel=True),
    )


def _load_objects(path: Path, keys: dict[str, str]) -> dict[str, Any]:
    """The megatron ShardedObjects `keys` (name: checkpoint key) of a checkpoint, by name."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedObject

    template = {name: ShardedObject(key, None, (1,), (0,)) for name, key in keys.items()}
    # Every rank reads the same objects: not a partition of the checkpoint.
    loaded = dist_checkpointing.load(template, str(path), validate_access_integrity=False)
    return {name: loaded[name] for name in keys}


def _local_params(inner: Any) -> Iterator[tuple[torch.nn.Parameter, tuple[int, int]]]:
    """This rank's parameters in the distributed optimizer, each with the range of its
    flattened elements whose optimizer state this rank holds."""
    for ranges in inner.gbuf_ranges:
        for buckets in ranges.values():
            for bucket in buckets:
                for param, range_map in bucket["param_map"].items():
                    local = range_map["param"]
                    yield param, (local.start, local.end)


def _saved_state(path: Path, inner: Any, layouts: int) -> dict[str, Any]:
    """The optimizer's non-parameter state (groups, step) from the saved bucket layouts'
    copies, their groups merged (a pipeline stage may lack a group another one has)."""
    from megatron.core.optimizer.optimizer import param_group_identifier_keys

    names = list(inner.state_dict())  # megatron's non-parameter state: "optimizer", ...
    keys = {
        f"{g}/{k}": f"optimizer.distributed.dp_group_idx_{g}.{k}"
        for g in range(layouts)
        for k in names
    }
    objects = _load_objects(path, keys)
    groups: dict[tuple[Any, ...], dict[str, Any]] = {}
    for g in range(layouts):
        for group in objects[f"{g}/optimizer"]["param_groups"]:
            groups.setdefault(tuple(group.get(k) for k in param_group_identifier_keys), group)
    state = {k: objects[f"0/{k}"] for k in names}
    state["optimizer"] = {**state["optimizer"], "param_groups": list(groups.values())}
    return state


def _read_key(src: reshard.Saved, name: str) -> str:
    return f"{src.tensor}.{name}@{src.start}"


def _assemble(
    param: torch.nn.Parameter,
    copies: Sequence[reshard.Copy],
    read: dict[str, torch.Tensor],
    name: str,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The flattened parameter's state `name`, filled from the saved pieces read."""
    full = torch.empty(param.numel(), dtype=dtype, device="cpu")
    for c in copies:
        saved = read[_read_key(c.source, name)].view(c.source.shape)
        target = full[c.target.first : c.target.first + c.target.numel]
        target.view(c.target.shape)[c.into].copy_(saved[c.out])
    return full


def _reshard(path: Path, model: torch.nn.Module, inner: Any, index: list[list[Any]]) -> None:
    """Loads a DISTRIBUTED checkpoint saved at another TP x PP (or bucket) layout, which
    megatron's own loader cannot: the model's tensors by their global shapes, the optimizer's
    non-parameter state (_saved_state), and the parameter state as reshard.plan says: the
    saved pieces this rank's parameters overlap are read (no rank reads more), assembled per
    parameter in host memory and cut to the rank's DP range."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(path))
    model.load_state_dict(loaded["model"])
    state = _saved_state(path, inner, len(index))

    by_param = _by_param(model)
    params = list(_local_params(inner))
    wanted = [_pieces(by_param[p], p) for p, _ in params]
    try:
        plan = reshard.plan([[reshard.Saved.of(r) for r in layout] for layout in index], wanted)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    # The state's names and dtypes (fp32 main parameter and moments), as this rank holds them.
    held = megatron_private.optimizer_param_state(inner, params[0][0]) if params else {}
    dtypes = {k: v.dtype for k, v in held.items() if k != "step"}

    def load_params() -> None:
        template = {
            _read_key(src, k): ShardedTensor(
                f"{src.tensor}.{k}",
                torch.empty(src.numel, dtype=dtype, device="cpu"),
                dtype,
                (src.numel,),
                (src.length,),
                (src.start,),
                None,
            )
            for src in plan.reads
            for k, dtype in dtypes.items()
        }
        # Pieces overlap between ranks (replicated pieces, a TP split read by two ranks).
        read = dist_checkpointing.load(template, str(path), validate_access_integrity=False)
        for (param, (start, end)), copies in zip(params, plan.copies, strict=True):
            # Assembled in host memory; megatron copies each into the optimizer's own device.
            shard = {k: _assemble(param, copies, read, k, dtypes[k])[start:end] for k in dtypes}
            megatron_private.set_optimizer_param_state(inner, param, shard)

    _load_state(inner, state, load_params)


def load_model(path: Path, model: torch.nn.Module, optimizer: Any) -> str:
    """Loads one model and its optimizer; returns how: "parallel" (megatron's dp_reshardable
    load, each rank reading its own shard), "reshard" (_reshard) or "model_space" (megatron's
    load of a per-parameter optimizer's state, at any layout)."""
    from megatron.core import dist_checkpointing

    content = dist_checkpointing.load_content_metadata(str(path)) or {}
    saved, current = content.get("optimizer_format"), format_of(optimizer)
    if saved != current:
        setting = {DISTRIBUTED: "true", MODEL_SPACE: "false"}
        raise CheckpointError(
            f"{path.parent.name}: saved with optim.distributed_optimizer="
            f"{setting.get(saved, saved)}, this run has {setting[current]}: resume it as saved"
        )
    inner = _distributed(optimizer)
    _init_state(optimizer)
    if inner is not None:
        layouts = content["layout"]["bucket_layouts"]
        index = _load_objects(path, {str(g): _INDEX_KEY.format(g) for g in range(layouts)})
        index = [index[str(g)] for g in range(layouts)]
        same = torch.tensor(
            int(
                layouts == _layout(inner)["bucket_layouts"]
                and index[inner.data_parallel_group_idx] == _bucket_index(model, inner)
            ),
            device="cpu",
        )
        # every rank takes the same path; a host-side flag, over the gloo group
        dist.all_reduce(same, op=dist.ReduceOp.MIN, group=host_group())
        if not same:
            _reshard(path, model, inner, index)
            return "reshard"
    loaded = dist_checkpointing.load(_sharded(model, optimizer, is_loading=True), str(path))
    model.load_state_dict(loaded["model"])
    _load_optimizer(optimizer, loaded["optimizer"])
    return "parallel" if inner is not None else MODEL_SPACE
