"""Training checkpoints that survive a kill at any moment and resume at any layout.

    run_dir/
      iter_0000040/            complete checkpoints only (written under .tmp-*, then renamed)
        policy/  value/        megatron torch_dist: model (global shapes) and optimizer
                               (AdamW moments, fp32 master weights, step: each rank's
                               bucket shard, and the buckets' index; see Layout)
        trainer_state.pt       iteration, LR/WD schedules, the run's own
                               state (data/rollout cursor, config), per-rank RNG states
      latest                   the newest complete iteration, replaced atomically, last

A save (synchronous, or asynchronous: written by a forked process while training goes on)
writes everything into a temporary directory, renames it into place (one atomic step) and
only then moves `latest`; a process killed mid-save leaves the previous checkpoint and
pointer untouched (the temporary directory is removed by the next save).

Layout. Model tensors are stored with their global shapes, so any TP x PP x DP layout reads
them. The distributed optimizer's state (fp32 master weights and Adam moments, 12 bytes per
parameter) is saved in megatron's `dp_reshardable` format: every rank writes its own shard of
the gradient buckets as it holds it, in parallel, with no gather onto one rank (megatron's
FullyParallelSaveStrategyWrapper spreads the writes of tensors replicated over DP ranks, the
model's weights, over those ranks). Beside it go the checkpoint's layout (TP, PP, DP, the
number of bucket layouts) in the content metadata and, per bucket layout, an index of where
each parameter (its global key and region) lies in the buckets. On load that index is
compared with the current one: unchanged (the same TP x PP and bucket layout; DP may differ,
which megatron's format reshards itself) -> megatron's parallel load, each rank reading only
its shard; changed -> a resharding load that reads, through the index, the regions of the
saved buckets the rank's parameters cover. Checkpoints saved before this format
(`fully_reshardable`: gathered onto DP rank 0 in model space; the content metadata says which)
still load. RNG states come back only at the same world size; elsewhere the caller reseeds.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
from collections.abc import Collection, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from rlef_hpc import lifetime
from rlef_hpc.checkpoint import atomic
from rlef_hpc.checkpoint.convert import CheckpointError
from rlef_hpc.dist_env import host_group

LATEST = atomic.LATEST
STATE = "trainer_state.pt"


def start_writer_helpers(ignoring: tuple[signal.Signals, ...]) -> None:
    """Starts the process megatron's checkpoint writers report through (a spawned Manager it
    otherwise starts at the first save), ignoring the signals in `ignoring`: Slurm sends
    SIGTERM (preemption, requeue) to every process of a job step, and this helper must live
    on while the trainer finishes its iteration and saves. Forked writers keep the trainer's
    own handlers; a spawned process keeps only ignored signals. Since no stop signal ends it,
    it ends with the trainer, however the trainer dies (rlef_hpc.lifetime)."""
    import multiprocessing
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is not None:
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in ignoring}
    try:
        # What megatron's _get_write_results_queue does, with an initializer; the queue's
        # proxy keeps the manager referenced (and shuts it down at exit).
        manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
        manager.start(lifetime.die_with_parent, lifetime.parent_token())
        filesystem_async._results_queue = manager.Queue()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


# The distributed optimizer's state as each rank holds it (its shard of the gradient buckets),
# written by every rank in parallel: megatron 0.16.1's parallel format. (Its other parallel
# one, fully_sharded_model_space, cannot be saved: it builds ShardedTensors with a
# flattened_range, which 0.16.1's ShardedTensor rejects.) Reshardable by megatron over DP only.
PARALLEL = "dp_reshardable"
# The format before: the state gathered over gloo onto DP rank 0 and stored per parameter in
# model space; every rank reads the whole of it on load. Old checkpoints have it.
FULLY_RESHARDABLE = "fully_reshardable"
_SHARDING = {
    PARALLEL: {"distrib_optim_sharding_type": PARALLEL},
    FULLY_RESHARDABLE: {
        "distrib_optim_sharding_type": FULLY_RESHARDABLE,
        "distrib_optim_fully_reshardable_mem_efficient": True,
    },
}
# Kept for callers of the old name: the metadata old checkpoints were saved with.
OPTIMIZER_METADATA = _SHARDING[FULLY_RESHARDABLE]
# Per bucket layout (megatron's data_parallel_group_idx: one per TP x PP rank), where each
# parameter's optimizer state lies in the saved buckets; read by the resharding load.
_INDEX_KEY = "rlef.optimizer_bucket_index.dp_group_idx_{}"


def _adams(optimizer: Any) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside a megatron (chained) optimizer."""
    return [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])]


def _distributed(optimizer: Any) -> Any:
    """The megatron DistributedOptimizer in `optimizer`, or None (not distributed, or chained:
    the formats here are the distributed optimizer's)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    if len(inner) == 1 and isinstance(inner[0], DistributedOptimizer):
        return inner[0]
    return None


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
                    state["step"] = torch.zeros(())
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)


def _load_state(inner: Any, state: dict[str, Any], load_params: Any) -> None:
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
    """optimizer.load_state_dict of a loaded megatron sharded state (either format), with the
    torch Adam workarounds of _load_state. Other optimizers (TE's FusedAdam) load as megatron
    loads them."""
    inner = _distributed(optimizer)
    if inner is None or "param_state" not in state or not _per_param_step(inner.optimizer):
        optimizer.load_state_dict(state)
        return
    param_state = state.pop("param_state")
    sharding = state.pop("param_state_sharding_type")
    loaders = {
        PARALLEL: inner.load_parameter_state_from_dp_reshardable,
        FULLY_RESHARDABLE: inner.load_parameter_state_from_fully_reshardable,
    }
    _load_state(inner, state, lambda: loaders[sharding](param_state))


def _sharded(
    model: torch.nn.Module, optimizer: Any, is_loading: bool, sharding: str
) -> dict[str, Any]:
    """The model's and its megatron optimizer's state as megatron sharded state, the
    optimizer's in format `sharding`."""
    model_state = model.sharded_state_dict()
    optim_state = optimizer.sharded_state_dict(
        model_state, is_loading=is_loading, metadata=_SHARDING[sharding]
    )
    return {"model": model_state, "optimizer": optim_state}


def _pieces(sharded: Any, param: torch.nn.Parameter) -> list[dict[str, Any]]:
    """Where `param`'s (TP-local) tensor lies in the global tensors it is saved as: one piece,
    or several where megatron saves it through a factory (the SwiGLU fc1 weight: its two
    halves are two TP-sharded tensors). Each piece: the global key, the region (offset and
    shape, over the global tensor's axes) and the piece's first element in the flattened
    parameter. Built on a meta tensor: no memory."""
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    data = torch.empty(param.shape, dtype=param.dtype, device="meta")
    if isinstance(sharded, ShardedTensorFactory):
        built = [v for v in nested_values(replace(sharded, data=data).build())]
    else:
        built = [replace(sharded, data=data)]
    pieces = []
    for st in built:
        if not isinstance(st, ShardedTensor) or st.flattened_range is not None:
            raise CheckpointError(f"cannot index {sharded.key}: not a plain tensor ({st})")
        if not st.data.is_contiguous():
            raise CheckpointError(f"cannot index {st.key}: a non-contiguous part of a parameter")
        pieces.append(
            {
                "key": st.key,
                "offset": list(st.global_offset),
                "shape": [1] * st.prepend_axis_num + list(st.local_shape),
                "first": st.data.storage_offset(),
            }
        )
    return pieces


def _bucket_index(model_state: dict[str, Any], inner: Any) -> list[dict[str, Any]]:
    """This rank's bucket layout (the same on every DP rank of its group): for each piece of
    each parameter (_pieces), the saved bucket tensor holding its optimizer state (megatron's
    dp_reshardable key, less the state's name), that tensor's length and where in it the
    piece starts. Pieces are stored in row-major order, as the flattened parameter."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories

    tensors, _ = extract_sharded_tensors_and_factories(model_state)
    by_param = {sh.data: sh for sh in nested_values(tensors)}
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
                first = piece.pop("first")
                index.append(
                    {
                        **piece,
                        "tensor": tensor,
                        "length": bucket.numel_unpadded,
                        "start": start - bucket.offset + first,
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


def _save_state(model: torch.nn.Module, optimizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The sharded state to save (the parallel format, with the bucket index) and the content
    metadata that describes it."""
    from megatron.core.dist_checkpointing import ShardedObject

    state = _sharded(model, optimizer, is_loading=False, sharding=PARALLEL)
    inner = _distributed(optimizer)
    if inner is not None:
        # One copy per bucket layout, written by its DP rank 0.
        state["bucket_index"] = ShardedObject(
            _INDEX_KEY.format(inner.data_parallel_group_idx),
            _bucket_index(state["model"], inner),
            (1,),
            (0,),
            replica_id=(
                inner.distributed_optimizer_instance_id,
                0,
                inner.data_parallel_group.rank(),
            ),
        )
    return state, {**_SHARDING[PARALLEL], "layout": _layout(inner)}


def _save_strategy() -> Any:
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


def _in_order(requests: Sequence[Any]) -> Any:
    """One megatron AsyncRequest doing the writes of `requests` one after the other in one
    background process, then their finalizations in the same order. Megatron's writers report
    through one queue shared by every save in flight, and each finalization takes the oldest
    report: concurrent saves (one background process each) could swap reports, and a model's
    metadata would then describe the other model's files. The background process ends with
    the trainer: a writer of a killed trainer's checkpoint has nothing left to write for."""
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest

    calls = []
    for r in requests:
        args = list(r.async_fn_args)
        if r.preload_fn is not None:  # stages device tensors to host, as megatron's caller does
            args[1] = r.preload_fn()
        calls.append((r.async_fn, args, r.async_fn_kwargs))

    finalize = [fn for r in requests for fn in r.finalize_fns]
    return AsyncRequest(_call_all, (calls, lifetime.parent_token()), finalize)


def _call_all(
    calls: Sequence[tuple[Any, list[Any], dict[str, Any]]], parent: tuple[int, bool]
) -> None:
    lifetime.die_with_parent(*parent)
    for fn, args, kwargs in calls:
        if fn is not None:  # None: nothing of that model to write on this rank
            fn(*args, **kwargs)


def save(
    run_dir: str | Path,
    iteration: int,
    models: Sequence[tuple[str, torch.nn.Module, Any]],
    schedulers: dict[str, Any],
    run_state: dict[str, Any],
    keep_last: int = 3,
    model_config: dict[str, Any] | None = None,
    async_queue: Any = None,
    files: Sequence[Path] = (),
    protect: Collection[int] = (),
) -> Path:
    """Collective: every rank calls it. Returns the checkpoint's directory. Retention keeps
    the newest `keep_last` checkpoints and those of the iterations in `protect`. With
    `model_config` (ModelConfig fields and "dtype"), tools/convert_to_hf.py can export it;
    `files` (e.g. the tokenizer's) are copied in beside it.

    With `async_queue` (megatron's AsyncCallsQueue) the tensors are written by a forked
    process while training goes on; the checkpoint is renamed into place and `latest` moved
    when the queue finalizes it (`async_queue.maybe_finalize_async_calls`, which the next save
    also does, blocking: one save in flight at a time)."""
    from megatron.core import dist_checkpointing

    # Megatron's writers (synchronous ones too) report through a Manager that it would start
    # itself, one that outlives a killed caller; a no-op after the trainer's own call.
    start_writer_helpers(ignoring=())
    if async_queue is not None:
        async_queue.maybe_finalize_async_calls(blocking=True)
    run_dir = Path(run_dir)
    final, tmp = (
        run_dir / checkpoint_name(iteration),
        run_dir / f".tmp-{checkpoint_name(iteration)}",
    )
    rank = dist.get_rank()
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in run_dir.glob(".tmp-*"):  # a save that was killed
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()

    def commit() -> None:
        if rank == 0:
            keep = {checkpoint_name(i) for i in protect}
            atomic.commit(tmp, final, iteration, "iter_*", keep_last, keep)
        dist.barrier()

    requests = []
    for name, model, optimizer in models:
        (tmp / name).mkdir(exist_ok=True)
        state, content = _save_state(model, optimizer)
        requests.append(
            dist_checkpointing.save(
                state,
                str(tmp / name),
                sharded_strategy=_save_strategy(),
                content_metadata=content,
                async_sharded_save=async_queue is not None,
            )
        )
    if async_queue is not None:
        request = _in_order(requests)
        request.add_finalize_fn(commit)
        async_queue.schedule_async_request(request)
    rng = [None] * dist.get_world_size()
    dist.all_gather_object(rng, {"torch": torch.get_rng_state()}, group=host_group())
    if rank == 0:
        torch.save(
            {
                "iteration": iteration,
                "schedulers": {k: s.state_dict() for k, s in schedulers.items()},
                "run": run_state,
                "rng": rng,
            },
            tmp / STATE,
        )
        if model_config is not None:
            (tmp / "model_config.json").write_text(json.dumps(model_config))
        for file in files:
            shutil.copy(file, tmp / Path(file).name)
    if async_queue is None:
        commit()
    else:
        dist.barrier()  # the state file is written before any rank can finalize the commit
    return final


def committed(run_dir: str | Path) -> dict[int, Path]:
    """The complete checkpoints of a run by iteration (a save in progress is not one yet)."""
    found = {}
    for path in Path(run_dir).glob("iter_*"):
        if (path / STATE).exists() and path.name[len("iter_") :].isdigit():
            found[int(path.name[len("iter_") :])] = path
    return dict(sorted(found.items()))


def latest(run_dir: str | Path) -> Path | None:
    pointer = Path(run_dir) / LATEST
    if not pointer.exists():
        return None
    path = Path(run_dir) / checkpoint_name(int(pointer.read_text().strip()))
    if not (path / STATE).exists():
        raise CheckpointError(
            f"{pointer} points to {path.name}, which is not a complete checkpoint"
        )
    return path


def _load_objects(path: Path, keys: dict[str, str]) -> dict[str, Any]:
    """The megatron ShardedObjects `keys` (name: checkpoint key) of a checkpoint, by name."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedObject

    template = {name: ShardedObject(key, None, (1,), (0,)) for name, key in keys.items()}
    # Every rank reads the same objects: not a partition of the checkpoint.
    loaded = dist_checkpointing.load(template, str(path), validate_access_integrity=False)
    return {name: loaded[name] for name in keys}


def _overlap(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[int, int]] | None:
    """The region two pieces of one global tensor share, per axis (start, end), or None."""
    region = []
    for oa, sa, ob, sb in zip(a["offset"], a["shape"], b["offset"], b["shape"], strict=True):
        lo, hi = max(oa, ob), min(oa + sa, ob + sb)
        if lo >= hi:
            return None
        region.append((lo, hi))
    return region


def _within(region: list[tuple[int, int]], piece: dict[str, Any]) -> tuple[slice, ...]:
    """`region` (global coordinates) as an index into `piece`."""
    return tuple(slice(lo - o, hi - o) for (lo, hi), o in zip(region, piece["offset"], strict=True))


def _reshard(path: Path, model: torch.nn.Module, inner: Any, index: list[list[Any]]) -> None:
    """Loads a dp_reshardable checkpoint saved at another TP x PP (or bucket) layout, which
    megatron's own loader cannot: the model's tensors by their global shapes; the optimizer's
    non-parameter state (groups, step) from the saved bucket layouts' copies, their groups
    merged (a pipeline stage may lack a group another one has); the parameter state by the
    saved bucket index (`index`, one list per saved layout): for each of this rank's
    parameters, the saved pieces of its global tensor its region overlaps are read (whole:
    a changed TP split reads up to the neighbouring shard too) from the saved buckets and
    cut to the rank's DP range. No rank reads more than the pieces its own parameters
    overlap, unlike the old fully_reshardable load (every rank read its TP x PP part of every
    DP rank's state)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories
    from megatron.core.optimizer.optimizer import param_group_identifier_keys

    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(path))
    model.load_state_dict(loaded["model"])

    names = list(inner.state_dict())  # megatron's non-parameter state: "optimizer", ...
    objects = _load_objects(
        path,
        {
            f"{g}/{k}": f"optimizer.distributed.dp_group_idx_{g}.{k}"
            for g in range(len(index))
            for k in names
        },
    )
    groups: dict[tuple[Any, ...], dict[str, Any]] = {}
    for g in range(len(index)):
        for group in objects[f"{g}/optimizer"]["param_groups"]:
            groups.setdefault(tuple(group.get(k) for k in param_group_identifier_keys), group)
    state = {k: objects[f"0/{k}"] for k in names}
    state["optimizer"] = {**state["optimizer"], "param_groups": list(groups.values())}

    # Where each global tensor's pieces were saved; a piece replicated over TP ranks (the
    # norms) is in every one of their layouts: any copy serves.
    sources: dict[str, dict[tuple[int, ...], dict[str, Any]]] = {}
    for layout in index:
        for piece in layout:
            sources.setdefault(piece["key"], {}).setdefault(tuple(piece["offset"]), piece)
    tensors, _ = extract_sharded_tensors_and_factories(model.sharded_state_dict())
    by_param = {sh.data: sh for sh in nested_values(tensors)}

    def load_params() -> None:
        plan = []
        wanted = {}
        for ranges in inner.gbuf_ranges:
            for buckets in ranges.values():
                for bucket in buckets:
                    for param, range_map in bucket["param_map"].items():
                        held = inner._get_main_param_and_optimizer_states(param)
                        dtypes = {k: v.dtype for k, v in held.items() if k != "step"}
                        pairs = []
                        for target in _pieces(by_param[param], param):
                            covered = 0
                            for src in sources.get(target["key"], {}).values():
                                region = _overlap(target, src)
                                if region is None:
                                    continue
                                covered += math.prod(hi - lo for lo, hi in region)
                                pairs.append((target, src, region))
                                n = math.prod(src["shape"])
                                for k, dtype in dtypes.items():
                                    wanted[f"{src['tensor']}.{k}@{src['start']}"] = ShardedTensor(
                                        f"{src['tensor']}.{k}",
                                        torch.empty(n, dtype=dtype, device="cpu"),
                                        dtype,
                                        (n,),
                                        (src["length"],),
                                        (src["start"],),
                                        None,
                                    )
                            if covered != math.prod(target["shape"]):
                                raise CheckpointError(
                                    f"{path}: the saved optimizer state does not cover "
                                    f"{target['key']} at {target['offset']} {target['shape']}"
                                )
                        plan.append((param, range_map["param"], dtypes, pairs))
        # Pieces overlap between ranks (replicated pieces, a TP split read by two ranks).
        read = dist_checkpointing.load(wanted, str(path), validate_access_integrity=False)
        for param, local, dtypes, pairs in plan:
            # Assembled in host memory; megatron copies each into the optimizer's own device.
            full = {
                k: torch.empty(param.numel(), dtype=dtype, device="cpu")
                for k, dtype in dtypes.items()
            }
            for target, src, region in pairs:
                into, out = _within(region, target), _within(region, src)
                first, n = target["first"], math.prod(target["shape"])
                for k in dtypes:
                    saved = read[f"{src['tensor']}.{k}@{src['start']}"].view(src["shape"])
                    full[k][first : first + n].view(target["shape"])[into].copy_(saved[out])
            inner._set_main_param_and_optimizer_states(
                param, {k: v[local.start : local.end] for k, v in full.items()}
            )

    _load_state(inner, state, load_params)


def _load_model(path: Path, model: torch.nn.Module, optimizer: Any) -> str:
    """Loads one model and its optimizer; returns how: "parallel" (megatron's dp_reshardable
    load, each rank reading its own shard), "reshard" (_reshard) or "fully_reshardable" (a
    checkpoint from before the parallel format, or an optimizer that is not distributed)."""
    from megatron.core import dist_checkpointing

    content = dist_checkpointing.load_content_metadata(str(path)) or {}
    # Checkpoints from before carry their format (fully_reshardable) too.
    sharding = content.get("distrib_optim_sharding_type", FULLY_RESHARDABLE)
    inner = _distributed(optimizer)
    _init_state(optimizer)
    how = FULLY_RESHARDABLE
    if sharding == PARALLEL:
        if inner is None:
            raise CheckpointError(
                f"{path}: optimizer state saved by megatron's distributed optimizer "
                f"({PARALLEL}); this run's optimizer is not one"
            )
        saved_layouts = content["layout"]["bucket_layouts"]
        index = _load_objects(path, {str(g): _INDEX_KEY.format(g) for g in range(saved_layouts)})
        index = [index[str(g)] for g in range(saved_layouts)]
        current = _bucket_index(model.sharded_state_dict(), inner)
        same = torch.tensor(
            int(
                saved_layouts == _layout(inner)["bucket_layouts"]
                and index[inner.data_parallel_group_idx] == current
            ),
            device="cpu",
        )
        # every rank takes the same path; a host-side flag, over the gloo group
        dist.all_reduce(same, op=dist.ReduceOp.MIN, group=host_group())
        if not same:
            _reshard(path, model, inner, index)
            return "reshard"
        how = "parallel"
    template = _sharded(model, optimizer, is_loading=True, sharding=sharding)
    loaded = dist_checkpointing.load(template, str(path))
    model.load_state_dict(loaded["model"])
    _load_optimizer(optimizer, loaded["optimizer"])
    return how


def load(
    checkpoint: str | Path,
    models: Sequence[tuple[str, torch.nn.Module, torch.optim.Optimizer]],
    schedulers: dict[str, Any],
    report: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Collective. Loads models, optimizers and schedules in place; returns the run's state
    (with "iteration"). `report`, if given, receives per model how it was loaded ("parallel":
    the layout is unchanged; "reshard": it changed; "fully_reshardable": an old checkpoint)."""
    checkpoint = Path(checkpoint)
    if not (checkpoint / STATE).exists():
        raise CheckpointError(f"{checkpoint} is not a training checkpoint (no {STATE})")
    trainer = torch.load(checkpoint / STATE, weights_only=False)
    for name, model, optimizer in models:
        if not (checkpoint / name).is_dir():
            raise CheckpointError(f"{checkpoint} has no {name}/")
        how = _load_model(checkpoint / name, model, optimizer)
        if report is not None:
            report[name] = how
    for key, scheduler in schedulers.items():
        # megatron's load_state_dict steps the scheduler forward by the saved count from where
        # it stands: from 0, or a fresh scheduler's warm-up pre-step would be counted twice.
        scheduler.num_steps = 0
        scheduler.load_state_dict(trainer["schedulers"][key])
    if len(trainer["rng"]) == dist.get_world_size():
        torch.set_rng_state(trainer["rng"][dist.get_rank()]["torch"])
    return {**trainer["run"], "iteration": trainer["iteration"]}
