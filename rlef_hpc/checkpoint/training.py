"""Training checkpoints that survive a kill at any moment, a damaged file and a full disk, and
resume at any layout.

    run_dir/
      iter_0000040/            complete checkpoints only (written under .tmp-*, then renamed)
        policy/  value/        megatron torch_dist: model (global shapes) and optimizer
                               (AdamW moments, fp32 master weights, step: sharded_state)
        trainer_state.pt       iteration, LR/WD schedules, the run's own
                               state (data/rollout cursor, config), per-rank RNG states
        manifest.json          size and SHA-256 of every file (rlef_hpc.checkpoint.manifest)
      latest                   the newest complete iteration, replaced atomically, last
      damaged/                 checkpoints a resume found damaged, set aside, with the reason

A save (synchronous, or asynchronous: written by a forked process while training goes on)
writes everything into a temporary directory, records the manifest, renames it into place (one
atomic step) and only then moves `latest`; a process killed mid-save leaves the previous
checkpoint and pointer untouched. A save that fails (a full disk) removes its temporary
directory and says so in one line (CheckpointError). A resume (`resume_point`) removes the
temporaries of killed saves, checks the newest checkpoint against its manifest and sets aside
each damaged one, resuming from the newest intact one.

The models' and optimizers' state, its formats and how it loads at another layout:
rlef_hpc.checkpoint.sharded_state. RNG states come back only at the same world size;
elsewhere the caller reseeds.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from rlef_hpc import atomic, lifetime
from rlef_hpc.checkpoint import manifest, sharded_state, space
from rlef_hpc.checkpoint.convert import CheckpointError
from rlef_hpc.dist_env import host_group
from rlef_hpc.models import megatron_private

LATEST = atomic.LATEST
STATE = "trainer_state.pt"
DAMAGED = "damaged"
log = logging.getLogger(__name__)


def start_writer_helpers(ignoring: tuple[signal.Signals, ...]) -> None:
    """Starts the process megatron's checkpoint writers report through (a spawned Manager it
    otherwise starts at the first save), ignoring the signals in `ignoring`: Slurm sends
    SIGTERM (preemption, requeue) to every process of a job step, and this helper must live
    on while the trainer finishes its iteration and saves. Forked writers keep the trainer's
    own handlers; a spawned process keeps only ignored signals. Since no stop signal ends it,
    it ends with the trainer, however the trainer dies (rlef_hpc.lifetime)."""

    def make() -> Any:
        import multiprocessing
        from multiprocessing.managers import SyncManager

        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in ignoring}
        try:
            # What megatron's _get_write_results_queue does, with an initializer; the queue's
            # proxy keeps the manager referenced (and shuts it down at exit).
            manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
            manager.start(lifetime.die_with_parent, lifetime.parent_token())
            return manager.Queue()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, signal.SIG_DFL if handler is None else handler)

    megatron_private.install_writer_results_queue(make)


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _in_order(requests: Sequence[Any], then: tuple[Any, list[Any]], finalize: Any) -> Any:
    """One megatron AsyncRequest doing the writes of `requests` one after the other in one
    background process, then `then` (a function and its arguments: this rank's digests), and
    finally `finalize`, given the requests' finalizations to run first. Megatron's writers
    report through one queue shared by every save in flight, and each finalization takes the
    oldest report: concurrent saves (one background process each) could swap reports, and a
    model's metadata would then describe the other model's files. The background process ends
    with the trainer: a writer of a killed trainer's checkpoint has nothing left to write for."""
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest

    calls = []
    for r in requests:
        args = list(r.async_fn_args)
        if r.preload_fn is not None:  # stages device tensors to host, as megatron's caller does
            args[1] = r.preload_fn()
        calls.append((r.async_fn, args, r.async_fn_kwargs))
    calls.append((then[0], then[1], {}))
    megatron_finalizes = [fn for r in requests for fn in r.finalize_fns]
    return AsyncRequest(
        _call_all, (calls, lifetime.parent_token()), [lambda: finalize(megatron_finalizes)]
    )


def _call_all(
    calls: Sequence[tuple[Any, list[Any], dict[str, Any]]], parent: tuple[int, bool]
) -> None:
    lifetime.die_with_parent(*parent)
    for fn, args, kwargs in calls:
        if fn is not None:  # None: nothing of that model to write on this rank
            fn(*args, **kwargs)


class _Attempt:
    """One save's failures. Each step that can fail on some ranks and not others (rank 0's
    writes; a full disk under one rank's files) ends in an agreement over the host group, so
    that every rank raises together, never one while the others wait in a collective; the
    partial checkpoint is then removed, and the reason said in one line."""

    def __init__(self, run_dir: Path, iteration: int) -> None:
        self.run_dir = run_dir
        self.final = run_dir / checkpoint_name(iteration)
        self.tmp = atomic.temporary(self.final, shared=True)  # every rank writes into it
        self.rank = dist.get_rank()
        self.previous = None
        self.free = 0
        if self.rank == 0:
            found = _numbered(run_dir)
            self.previous = found[max(found)] if found else None
            self.free = space.free(run_dir)

    def run(self, step: Callable[[], Any]) -> None:
        """Collective: `step()` here, then every rank raises if it failed on any."""
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

        error = None
        try:
            step()
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - every rank must hear of it
            error = e
        self.agree(error)

    def agree(self, error: BaseException | None) -> None:
        # A full disk: ENOSPC somewhere in the error, or (torch's zip writer reports a short
        # write without errno: "unexpected pos") the filesystem as good as full now.
        full = space.no_space(error) or (
            error is not None and self.rank == 0 and space.free(self.run_dir) < space.FULL
        )
        failed = torch.tensor([int(error is not None), int(full)], device="cpu")  # host group
        dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=host_group())
        if not failed[0]:
            return
        if error is not None:
            log.error("saving %s failed", self.final.name, exc_info=error)
        message = [self._message(bool(failed[1]), error) if self.rank == 0 else ""]
        dist.broadcast_object_list(message, src=0, group=host_group())
        raise CheckpointError(message[0]) from error

    def refuse_if_full(self) -> None:
        """Collective: refuses a save the filesystem cannot hold (less free than the previous
        checkpoint takes) before anything is written."""
        need = space.size(self.previous) if self.previous is not None else 0
        full = torch.tensor(int(self.rank == 0 and need > self.free), device="cpu")
        dist.all_reduce(full, op=dist.ReduceOp.MAX, group=host_group())
        if full:
            message = [self._full(need) if self.rank == 0 else ""]
            dist.broadcast_object_list(message, src=0, group=host_group())
            raise CheckpointError(message[0])

    def _message(self, full: bool, error: BaseException | None) -> str:
        written = space.size(self.tmp) if self.tmp.exists() else 0
        atomic.remove(self.tmp)  # what a partial save holds is given back
        if full:
            need = space.size(self.previous) if self.previous is not None else 0
            return self._full(need, written)
        for failure in getattr(error, "failures", {}).values():  # torch's CheckpointException
            error = failure[0]  # a rank's own error, not the summary of all
            break
        first = (str(error).strip().splitlines() or [""])[0]
        why = f"{type(error).__name__}: {first}" if error is not None else ""
        return (
            f"checkpoint {self.final.name} not saved ({why[:300] or 'on a rank'}); {self._intact()}"
        )

    def _full(self, need: int, written: int = 0) -> str:
        needed = f"about {space.human(need)}" if need else f"more than {space.human(written)}"
        return (
            f"checkpoint {self.final.name} not saved: no space left on "
            f"{space.filesystem(self.run_dir)}: it needs {needed}, "
            f"{space.human(self.free)} was free; {self._intact()}"
        )

    def _intact(self) -> str:
        if self.previous is None:
            return "no earlier checkpoint"
        return f"{self.previous.name} is intact (details: the run's log)"


def _record_own(root: Path, models: Sequence[str], rank: int) -> None:
    """manifest.record_own, where a failure costs only time: at the commit rank 0 hashes what
    no rank recorded."""
    try:
        manifest.record_own(root, models, rank)
    except OSError as e:
        log.warning("rank %d: digests of its files not recorded (%s)", rank, e)


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
    `files` (e.g. the tokenizer's) are copied in beside it. Raises CheckpointError, on every
    rank, when the save fails (a full disk), with the partial checkpoint removed.

    With `async_queue` (megatron's AsyncCallsQueue) the tensors are written by a forked
    process while training goes on; the checkpoint is renamed into place and `latest` moved
    when the queue finalizes it (`async_queue.maybe_finalize_async_calls`, which the next save
    also does, blocking: one save in flight at a time); a failure is raised there."""
    from megatron.core import dist_checkpointing

    # Megatron's writers (synchronous ones too) report through a Manager that it would start
    # itself, one that outlives a killed caller; a no-op after the trainer's own call.
    start_writer_helpers(ignoring=())
    if async_queue is not None:
        async_queue.maybe_finalize_async_calls(blocking=True)
    attempt = _Attempt(Path(run_dir), iteration)
    tmp, rank = attempt.tmp, attempt.rank
    names = [name for name, _, _ in models]
    attempt.refuse_if_full()
    rng = [None] * dist.get_world_size()
    dist.all_gather_object(rng, {"torch": torch.get_rng_state()}, group=host_group())

    def small_files() -> None:  # rank 0's, before any background write is scheduled
        attempt.run_dir.mkdir(parents=True, exist_ok=True)
        atomic.sweep(attempt.run_dir, "iter_*")  # a save that was killed
        tmp.mkdir()
        for name in names:
            (tmp / name).mkdir()
        trainer = {
            "iteration": iteration,
            "schedulers": {k: s.state_dict() for k, s in schedulers.items()},
            "run": run_state,
            "rng": rng,
        }
        torch.save(trainer, tmp / STATE)
        if model_config is not None:
            (tmp / "model_config.json").write_text(json.dumps(model_config))
        for file in files:
            shutil.copy(file, tmp / Path(file).name)

    attempt.run(small_files if rank == 0 else lambda: None)
    requests = []

    def write() -> None:
        for name, model, optimizer in models:
            state, content = sharded_state.save_state(model, optimizer)
            requests.append(
                dist_checkpointing.save(
                    state,
                    str(tmp / name),
                    sharded_strategy=sharded_state.save_strategy(),
                    content_metadata=content,
                    async_sharded_save=async_queue is not None,
                )
            )

    def commit() -> None:
        if rank == 0:
            manifest.write(tmp)
            keep = {checkpoint_name(i) for i in protect}
            atomic.commit(tmp, attempt.final, iteration, "iter_*", keep_last, keep)

    def finalize(megatron_finalizes: Sequence[Callable[[], None]]) -> None:
        attempt.run(lambda: [fn() for fn in megatron_finalizes])
        attempt.run(commit)

    attempt.run(write)
    if async_queue is None:
        _record_own(tmp, names, rank)
        attempt.run(commit)
    else:
        request = _in_order(requests, (_record_own, [tmp, names, rank]), finalize)
        async_queue.schedule_async_request(request)
    return attempt.final


def _numbered(run_dir: str | Path) -> dict[int, Path]:
    """Every checkpoint directory of a run by iteration, intact or not."""
    found = {}
    for path in Path(run_dir).glob("iter_*"):
        if path.is_dir() and path.name[len("iter_") :].isdigit():
            found[int(path.name[len("iter_") :])] = path
    return dict(sorted(found.items()))


def committed(run_dir: str | Path) -> dict[int, Path]:
    """The complete checkpoints of a run by iteration (a save in progress is not one yet)."""
    return {i: p for i, p in _numbered(run_dir).items() if (p / STATE).exists()}


def latest_iteration(run_dir: str | Path) -> int | None:
    """What `latest` says, unchecked."""
    pointer = Path(run_dir) / LATEST
    return int(pointer.read_text().strip()) if pointer.exists() else None


def latest(run_dir: str | Path) -> Path | None:
    iteration = latest_iteration(run_dir)
    if iteration is None:
        return None
    pointer, path = Path(run_dir) / LATEST, Path(run_dir) / checkpoint_name(iteration)
    if not (path / STATE).exists():
        raise CheckpointError(
            f"{pointer} points to {path.name}, which is not a complete checkpoint"
        )
    return path


def load(
    checkpoint: str | Path,
    models: Sequence[tuple[str, torch.nn.Module, torch.optim.Optimizer]],
    schedulers: dict[str, Any],
    report: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Collective. Loads models, optimizers and schedules in place; returns the run's state
    (with "iteration"). `report`, if given, receives per model how it was loaded ("parallel":
    the layout is unchanged; "reshard": it changed; "model_space": no distributed optimizer)."""
    checkpoint = Path(checkpoint)
    if not (checkpoint / STATE).exists():
        raise CheckpointError(f"{checkpoint} is not a training checkpoint (no {STATE})")
    trainer = torch.load(checkpoint / STATE, weights_only=False)
    for name, model, optimizer in models:
        if not (checkpoint / name).is_dir():
            raise CheckpointError(f"{checkpoint} has no {name}/")
        how = sharded_state.load_model(checkpoint / name, model, optimizer)
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


def _set_aside(run_dir: Path, checkpoint: Path, problems: Sequence[str]) -> Path:
    """Moves a damaged checkpoint to run_dir/damaged/ (out of every glob of checkpoints, kept
    for a person to look at), with its problems beside it (what `status_lines` shows)."""
    aside = run_dir / DAMAGED
    aside.mkdir(exist_ok=True)
    target, n = aside / checkpoint.name, 1
    while target.exists() or (aside / f"{target.name}.json").exists():  # set aside before
        n += 1
        target = aside / f"{checkpoint.name}-{n}"
    atomic.write_text(
        aside / f"{target.name}.json",
        json.dumps({"checkpoint": checkpoint.name, "at": time.time(), "problems": list(problems)}),
    )
    checkpoint.rename(target)
    return target


def resume_point(run_dir: str | Path, say: Callable[[str], None] = print) -> Path | None:
    """Collective: the checkpoint a run resumes from, None when it has none. Removes the
    temporary directories of killed saves, then checks the newest checkpoint against its
    manifest (every rank a share of the bytes): a damaged one is set aside (run_dir/damaged/)
    and the next newest checked, until one is intact; `latest` then points to it. Each
    checkpoint set aside is one line through `say` (rank 0), its problems go to the log.
    Raises CheckpointError when checkpoints exist and none is intact."""
    run_dir = Path(run_dir)
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0 and run_dir.is_dir():
        for stale in atomic.sweep(run_dir, "iter_*"):
            log.info("removed %s, left by a save that did not finish", stale.name)
    dist.barrier(group=host_group())
    found = _numbered(run_dir)
    chosen, damaged = None, {}
    for iteration in sorted(found, reverse=True):
        mine = manifest.check(found[iteration], rank, world)
        every: list[Any] = [None] * world
        dist.all_gather_object(every, mine, group=host_group())
        problems = manifest.merge(every)
        if not problems:
            chosen = iteration
            break
        damaged[found[iteration].name] = problems
        if rank == 0:
            target = _set_aside(run_dir, found[iteration], problems)
            log.warning("%s is damaged, set aside as %s: %s", found[iteration], target, problems)
        dist.barrier(group=host_group())
    if rank == 0 and damaged:
        first = next(iter(damaged.values()))
        more = f" and {len(first) - 1} more" if len(first) > 1 else ""
        resuming = (
            "none is intact" if chosen is None else f"resuming from {checkpoint_name(chosen)}"
        )
        say(
            f"checkpoint {', '.join(damaged)} damaged ({first[0]}{more}): set aside in "
            f"{run_dir / DAMAGED}/; {resuming}"
        )
    if found and chosen is None:
        raise CheckpointError(
            f"{run_dir}: no intact checkpoint (all set aside in {run_dir / DAMAGED}/); move "
            f"one back to resume from it, or start in another run.dir"
        )
    if rank == 0 and chosen is not None and latest_iteration(run_dir) != chosen:
        atomic.point(run_dir, chosen)
    dist.barrier(group=host_group())
    return found.get(chosen)


def status_lines(run_dir: str | Path) -> list[str]:
    """The run's newest checkpoint and those set aside as damaged, for tools/submit.py status."""
    run_dir = Path(run_dir)
    found = committed(run_dir)
    lines = [f"checkpoint: {found[max(found)].name if found else 'none yet'}"]
    records = {p.stem: json.loads(p.read_text()) for p in (run_dir / DAMAGED).glob("*.json")}
    for name, damaged in sorted(records.items(), key=lambda r: (r[1]["at"], r[0])):
        problems = damaged["problems"]
        more = f" and {len(problems) - 1} more" if len(problems) > 1 else ""
        lines.append(
            f"set aside as damaged: {damaged['checkpoint']} ({problems[0]}{more}), "
            f"in {run_dir / DAMAGED / name}"
        )
    return lines


def _estimated_bytes(models: Sequence[tuple[str, torch.nn.Module, Any]]) -> int:
    """Collective: about what one checkpoint of `models` takes: the weights as they are held,
    and the optimizer's fp32 main parameters and two Adam moments (12 bytes a parameter;
    without the distributed optimizer a fp32 model keeps no separate main copy)."""
    from megatron.core import parallel_state as ps

    total = 0
    for _, model, optimizer in models:
        for p in model.parameters():
            main = (
                0
                if sharded_state.format_of(optimizer) == sharded_state.MODEL_SPACE
                and p.dtype == torch.float32
                else 4
            )
            total += p.numel() * (p.element_size() + main + 8)
    # Each data-parallel replica holds the model once: the sum over ranks counts it DP times.
    summed = torch.tensor(total, dtype=torch.float64, device="cpu")
    dist.all_reduce(summed, group=host_group())
    return int(summed.item() / ps.get_data_parallel_world_size())


def check_space(
    run_dir: str | Path,
    models: Sequence[tuple[str, torch.nn.Module, Any]],
    keep_last: int,
    say: Callable[[str], None] = print,
) -> None:
    """Collective, at the start of a run: warns (one line through `say`, rank 0) when the run
    directory's filesystem cannot hold the checkpoints `keep_last` implies: that many kept and
    one more being written, each the size of the newest checkpoint (or, before the first, the
    estimate from the models), less those already there."""
    estimate = _estimated_bytes(models)
    if dist.get_rank() != 0:
        return
    run_dir = Path(run_dir)
    found = committed(run_dir)
    each = space.size(found[max(found)]) if found else estimate
    need, free = space.needed(each, keep_last, len(found)), space.free(run_dir)
    log.info("checkpoints of %s each; %s needed, %s free", each, need, free)
    if need > free:
        say(
            f"warning: {space.filesystem(run_dir)} has {space.human(free)} free; "
            f"run.keep_last={keep_last} with checkpoints of about {space.human(each)} needs "
            f"{space.human(need)} more ({keep_last} kept and one being written): a save "
            f"will fail when it fills"
        )
