"""Training checkpoints that survive a kill at any moment and resume at any layout.

    run_dir/
      iter_0000040/            complete checkpoints only (written under .tmp-*, then renamed)
        policy/  value/        megatron torch_dist: model and optimizer (AdamW moments, fp32
                               master weights, step), layout-free
        trainer_state.pt       iteration, LR/WD schedules, the run's own
                               state (data/rollout cursor, config), per-rank RNG states
      latest                   the newest complete iteration, replaced atomically, last

A save (synchronous, or asynchronous: written by a forked process while training goes on)
writes everything into a temporary directory, renames it into place (one atomic step) and
only then moves `latest`; a process killed mid-save leaves the previous checkpoint and
pointer untouched (the temporary directory is removed by the next save). Loading reshards:
model and optimizer tensors are stored with their global shapes, so any TP x PP x DP layout
reads them. RNG states come back only at the same world size; elsewhere the caller reseeds.
"""

from __future__ import annotations

import json
import shutil
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from rlef_hpc import lifetime
from rlef_hpc.checkpoint import atomic
from rlef_hpc.checkpoint.convert import CheckpointError

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


def _name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


# The distributed optimizer's state stored per parameter in model space (global shapes), so that
# any TP x PP x DP reads it; gathered over gloo into host memory, not into GPU memory.
OPTIMIZER_METADATA = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "distrib_optim_fully_reshardable_mem_efficient": True,
}


def _adams(optimizer: Any) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside a megatron (chained) optimizer."""
    return [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])]


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


def _load_optimizer(optimizer: Any, state: dict[str, Any]) -> None:
    """optimizer.load_state_dict, around two bugs of megatron-core 0.16.1's DistributedOptimizer
    with torch's Adam (no TE or apex): it gives every parameter one shared `step` tensor (torch
    increments each parameter's step in place: a shared one would advance by the number of
    parameters per update), then fails copying the parameter state, which has no `step`.
    Other optimizers (TE's FusedAdam) load as megatron loads them."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    (inner,) = getattr(optimizer, "chained_optimizers", [optimizer])
    if (
        not isinstance(inner, DistributedOptimizer)
        or "param_state" not in state
        or not _per_param_step(inner.optimizer)
    ):
        optimizer.load_state_dict(state)
        return
    param_state = state.pop("param_state")
    assert (
        state.pop("param_state_sharding_type") == OPTIMIZER_METADATA["distrib_optim_sharding_type"]
    )
    inner.load_state_dict(state)
    steps = {p: s.pop("step") for p, s in inner.optimizer.state.items() if "step" in s}
    inner.load_parameter_state_from_fully_reshardable(param_state)
    for p, step in steps.items():
        inner.optimizer.state[p]["step"] = step.clone()


def _sharded(model: torch.nn.Module, optimizer: Any, is_loading: bool) -> dict[str, Any]:
    """The model's and its megatron optimizer's state as megatron sharded state."""
    model_state = model.sharded_state_dict()
    optim_state = optimizer.sharded_state_dict(
        model_state, is_loading=is_loading, metadata=OPTIMIZER_METADATA
    )
    return {"model": model_state, "optimizer": optim_state}


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
) -> Path:
    """Collective: every rank calls it. Returns the checkpoint's directory. With
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
    final, tmp = run_dir / _name(iteration), run_dir / f".tmp-{_name(iteration)}"
    rank = dist.get_rank()
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in run_dir.glob(".tmp-*"):  # a save that was killed
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()

    def commit() -> None:
        if rank == 0:
            atomic.commit(tmp, final, iteration, "iter_*", keep_last)
        dist.barrier()

    requests = []
    for name, model, optimizer in models:
        (tmp / name).mkdir(exist_ok=True)
        requests.append(
            dist_checkpointing.save(
                _sharded(model, optimizer, is_loading=False),
                str(tmp / name),
                content_metadata=OPTIMIZER_METADATA,
                async_sharded_save=async_queue is not None,
            )
        )
    if async_queue is not None:
        request = _in_order(requests)
        request.add_finalize_fn(commit)
        async_queue.schedule_async_request(request)
    rng = [None] * dist.get_world_size()
    dist.all_gather_object(rng, {"torch": torch.get_rng_state()})
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


def latest(run_dir: str | Path) -> Path | None:
    pointer = Path(run_dir) / LATEST
    if not pointer.exists():
        return None
    path = Path(run_dir) / _name(int(pointer.read_text().strip()))
    if not (path / STATE).exists():
        raise CheckpointError(
            f"{pointer} points to {path.name}, which is not a complete checkpoint"
        )
    return path


def load(
    checkpoint: str | Path,
    models: Sequence[tuple[str, torch.nn.Module, torch.optim.Optimizer]],
    schedulers: dict[str, Any],
) -> dict[str, Any]:
    """Collective. Loads models, optimizers and schedules in place; returns the run's state
    (with "iteration")."""
    from megatron.core import dist_checkpointing

    checkpoint = Path(checkpoint)
    if not (checkpoint / STATE).exists():
        raise CheckpointError(f"{checkpoint} is not a training checkpoint (no {STATE})")
    trainer = torch.load(checkpoint / STATE, weights_only=False)
    for name, model, optimizer in models:
        if not (checkpoint / name).is_dir():
            raise CheckpointError(f"{checkpoint} has no {name}/")
        _init_state(optimizer)
        template = _sharded(model, optimizer, is_loading=True)
        loaded = dist_checkpointing.load(template, str(checkpoint / name))
        model.load_state_dict(loaded["model"])
        _load_optimizer(optimizer, loaded["optimizer"])
    for key, scheduler in schedulers.items():
        # megatron's load_state_dict steps the scheduler forward by the saved count from where
        # it stands: from 0, or a fresh scheduler's warm-up pre-step would be counted twice.
        scheduler.num_steps = 0
        scheduler.load_state_dict(trainer["schedulers"][key])
    if len(trainer["rng"]) == dist.get_world_size():
        torch.set_rng_state(trainer["rng"][dist.get_rank()]["torch"])
    return {**trainer["run"], "iteration": trainer["iteration"]}
