"""The weight bus: each new policy version broadcast from the trainer to the rollout workers'
engines over a process group of its own (NCCL between GPUs, gloo on CPU: the same code),
instead of every worker reading the whole model back from the shared filesystem.

Rendezvous. The trainer's rank 0 runs a TCPStore and writes its address to
`run_dir/weights/bus.json` (replaced atomically; a new `id` whenever the trainer restarts).
Workers read it and connect as clients. The store is independent of the trainer's and the
workers' own process groups, and nothing in it outlives a version but the newest number.

A round per version V (the trainer's `BusSender.send`, collective over its ranks):

    trainer rank 0                          a worker at its refresh point (between shards, or
                                            idle because it is ahead)
    announce = V
                                            sees announce > its version, joins:
                                            i = add(join/V, 1) - 1; member/V/i = its engine size
    waits up to join_wait_s for every
    configured worker, then writes
    close/V = the members (join order)
                                            excluded if i is past the members: it missed V
    per pipeline stage: one group of the    every engine process (all vLLM TP ranks) joins each
    stage's sender (rank 0) and every       stage's group (rank 1 + its offset), then loads the
    member's engine processes               stream in place
    buckets of at most bucket_mib/2 each:   bucket k's layout at v/V/s/m{k} (names, dtypes,
    layout into the store, then the bytes   shapes, offsets), its bytes from the broadcast
    broadcast (asynchronously: the next
    bucket is gathered meanwhile)

Failures. A worker that dies makes the sender's broadcast fail (or time out after
timeout_s): the trainer records the round as failed and goes on training, and the version is
then published as files too (rlef_hpc.train.sources), as it is whenever a configured worker
missed the round. The other members' streams end in an error (the broadcast's timeout):
their engine then holds part of a version, so the worker loads the newest complete version
from the files before it generates again (`rlef_hpc.rollout.publish.WeightFollower`): no
episode is ever sampled from a partial version. Groups are made per round, so a worker
that leaves, dies or is requeued is simply not a member of the next one. A failed group is
aborted the moment its failure shows, before anything else is sent.

On NCCL a failure must stay an exception of the round, as it is on gloo: torch's default
would take the whole process down (see `_group`). Left open: NCCL builds a group's
communicator at its first broadcast (`ncclCommInitRank`, blocking, with no timeout); a member
that dies between joining a round and that first broadcast leaves the others waiting in it.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from rlef_hpc import atomic

RENDEZVOUS = "bus.json"  # in run_dir/weights/
CONNECT_S = 5.0  # a worker's connection to the trainer's store, which is up or gone


class BusError(RuntimeError):
    """A round of the bus failed on this side (a member died, a timeout)."""


@dataclass(frozen=True)
class Round:
    """What an engine process needs to receive version `version` (pickles: it is sent to
    vLLM's worker processes)."""

    host: str
    port: int
    version: int
    stages: int
    first_rank: int  # this worker's first engine process's rank in each stage group
    size: int  # each stage group: the sender and every member's engine processes
    backend: str
    timeout_s: float


def _store(host: str, port: int, timeout_s: float, master: bool = False) -> Any:
    return dist.TCPStore(
        host,
        port,
        is_master=master,
        wait_for_workers=False,
        timeout=timedelta(seconds=timeout_s),
    )


@contextmanager
def _environment(**values: str) -> Iterator[None]:
    """These environment variables set while the block runs, then put back as they were:
    torch reads its NCCL settings when a group is constructed or aborted (see `_group`), so
    they apply to the bus's groups only, never to the process's own."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# A bus group of NCCL is made with blocking wait: what makes a failure of a round an
# exception in the thread that waits on it, and nothing else, on NCCL as on gloo. From torch's
# ProcessGroupNCCL.cpp (the 2.13 layout its installed ProcessGroupNCCL.hpp declares):
# - The constructor reads TORCH_NCCL_BLOCKING_WAIT and TORCH_NCCL_ASYNC_ERROR_HANDLING per
#   group (`blockingWait_`, `asyncErrorHandling_`, default 3 = SkipCleanUp), and starts the
#   group's watchdog thread only `if (!blockingWait_)`; the watchdog starts the group's
#   HeartbeatMonitor (`Watchdog::run`). With blocking wait `workEnqueue` enqueues nothing for
#   a watchdog either.
# - Without blocking wait, `Watchdog::runLoop` polls every 100 ms; on a failed or timed-out
#   work it calls `broadcastDumpSignal()`, which sets the process-wide static `shouldDump_`,
#   sleeps 4 x TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC, then `WorkNCCL::handleException` rethrows
#   in the watchdog thread under modes 1 and 3 (SHOULD_TEAR_DOWN): std::terminate. Worse,
#   `shouldDump_` is read by the HeartbeatMonitor of the process's first NCCL group (uid 0:
#   the trainer's own world), whose `runLoop` then dumps, sleeps
#   TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC and calls `terminateProcess`, whatever mode the failing
#   group had: per-group error handling (mode 0 or 2) would still lose the trainer 8 minutes
#   later. Aborting at once narrows the race but does not close it: the watchdog sees an
#   NCCL error within 100 ms, and checks each enqueued work's timeout even after `abort()`
#   set `terminateProcessGroup_`. Only a group with no watchdog never raises the signal.
# - With blocking wait, `WorkNCCL::wait` polls the work on the caller's thread until it
#   completes, fails (the communicator's async error) or times out, then on failure aborts
#   the communicator and rethrows there (`handleException(TearDown)` in the calling thread
#   is a Python exception): the round fails, the process goes on.
# The variable is set only while the group is constructed (`getCvarBool`, read in the
# constructor; the TORCH_ name outranks the older NCCL_BLOCKING_WAIT), so the trainer's own
# groups keep torch's watchdog. Not run on a GPU here: benchmarks/gpu_check.py's
# bus_nccl_failure check runs it (a stalled bus broadcast on one GPU, and the same with
# torch's default group as a control).
_NCCL_BUS_GROUP = {"TORCH_NCCL_BLOCKING_WAIT": "1"}


def _group(store: Any, prefix: str, rank: int, size: int, backend: str, timeout_s: float) -> Any:
    """A process group of its own (not registered with torch.distributed's default world,
    which the trainer's ranks have and the engines' processes may not)."""
    store = dist.PrefixStore(prefix, store)
    timeout = timedelta(seconds=timeout_s)
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        with _environment(**_NCCL_BUS_GROUP):
            return dist.ProcessGroupNCCL(store, rank, size, options)
    return dist.ProcessGroupGloo(store, rank, size, timeout)


def _broadcast(group: Any, tensor: torch.Tensor) -> Any:
    options = dist.BroadcastOptions()
    options.rootRank = 0  # the stage's sender
    return group.broadcast([tensor], options)


def _wait(work: Any, timeout_s: float) -> None:
    work.wait(timedelta(seconds=timeout_s))


def _abort(group: Any) -> None:
    """A failed group, at once: on NCCL a broadcast stuck on a dead peer holds its stream,
    and every kernel the process queues behind it (`WorkNCCL::wait` made the caller's stream
    wait on it), until its communicator is aborted; gloo's group is closed by dropping it.
    `ProcessGroupNCCL::abort` first calls `dumpExtraDebuggingInfo`, which under
    TORCH_NCCL_EXTRA_DUMP_ON_EXEC (read at the call) would set the process-wide dump signal
    that ends the process (see `_group`): off for the bus's abort."""
    abort = getattr(group, "abort", None)
    if abort is not None:
        try:
            with _environment(TORCH_NCCL_EXTRA_DUMP_ON_EXEC="0"):
                abort()
        except Exception:  # noqa: BLE001 - best effort, the round has failed already
            pass


# --- buckets ----------------------------------------------------------------------------------


class _Packer:
    """Packs tensors, as they come, into byte buffers of `capacity` on their device; each
    tensor is copied in at once, so the sender holds the buffer being filled and the tensor in
    hand, not a bucket's worth of tensors besides. A tensor larger than `capacity` is sent by
    itself, as it is."""

    ALIGN = 16  # every tensor starts where any dtype's view of the bytes may start

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.buffer: torch.Tensor | None = None
        self.layout: list[list[Any]] = []
        self.used = 0

    def add(self, name: str, t: torch.Tensor) -> list[tuple[torch.Tensor, list[list[Any]]]]:
        """The buffers this tensor completes (zero, one or two), each with its layout."""
        n = t.numel() * t.element_size()
        entry = [name, str(t.dtype).removeprefix("torch."), list(t.shape)]
        if n > self.capacity:
            t = t.contiguous()
            return [*self.flush(), (t.view(-1).view(torch.uint8), [[*entry, 0]])]
        done = self.flush() if self.used + n > self.capacity else []
        if self.buffer is None:
            self.buffer = torch.empty(self.capacity, dtype=torch.uint8, device=t.device)
        self.buffer[self.used : self.used + n].view(t.dtype).view(t.shape).copy_(t)
        self.layout.append([*entry, self.used])
        self.used = -(-(self.used + n) // self.ALIGN) * self.ALIGN
        return done

    def flush(self) -> list[tuple[torch.Tensor, list[list[Any]]]]:
        if not self.layout:
            return []
        assert self.buffer is not None
        done = [(self.buffer[: self.used], self.layout)]
        self.buffer, self.layout, self.used = None, [], 0
        return done


def _unpack(flat: torch.Tensor, layout: list[list[Any]]) -> Iterator[tuple[str, torch.Tensor]]:
    for name, dtype, shape, offset in layout:
        dt = getattr(torch, dtype)
        n = torch.Size(shape).numel() * dt.itemsize
        yield name, flat[offset : offset + n].view(dt).view(shape)


# --- the trainer's side -----------------------------------------------------------------------


def _host_address() -> str:
    """An address the workers' nodes reach this one at: its host name (Slurm nodes resolve
    each other's), or RLEF_BUS_ADDR (say, the address of a particular network interface)."""
    return os.environ.get("RLEF_BUS_ADDR") or socket.gethostname()


def _write_json(path: Path, value: dict[str, Any]) -> None:
    atomic.write_text(path, json.dumps(value, indent=1))


class BusSender:
    """The trainer's end (every trainer rank makes one: collective). The senders are the
    tensor-parallel rank 0 of each pipeline stage in the first data-parallel replica; the
    stage's other TP ranks take part in its gathers only, the other replicas in nothing."""

    def __init__(
        self,
        run_dir: Path,
        workers: int,
        bucket_mib: int,
        join_wait_s: float,
        timeout_s: float,
        host_group: Any,
        backend: str | None = None,
    ) -> None:
        """`backend`: the groups' (default NCCL where CUDA is, else gloo; benchmarks/gpu_check
        takes gloo on one GPU, where NCCL refuses two ranks on one device)."""
        from megatron.core import parallel_state as ps

        self.workers, self.join_wait_s, self.timeout_s = workers, join_wait_s, timeout_s
        # Two halves: one bucket is broadcast while the next fills (the sender holds at most
        # bucket_mib beyond the model, or one tensor larger than half of it).
        self.half_bytes = max(1, bucket_mib << 19)
        self.host_group = host_group
        self.rank = dist.get_rank()
        self.stage = ps.get_pipeline_model_parallel_rank()
        self.stages = ps.get_pipeline_model_parallel_world_size()
        self.gathers = ps.get_data_parallel_rank() == 0
        self.sends = self.gathers and ps.get_tensor_model_parallel_rank() == 0
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        address: list[Any] = [None]
        if self.rank == 0:
            host = _host_address()
            self.store = _store(host, 0, timeout_s, master=True)
            address[0] = (host, self.store.port)
        dist.broadcast_object_list(address, src=0, group=host_group)
        self.host, self.port = address[0]
        if self.rank != 0 and self.sends:
            self.store = _store(self.host, self.port, timeout_s)
        self._layouts: list[str] = []
        self.path = Path(run_dir) / "weights" / RENDEZVOUS
        self.id = uuid.uuid4().hex
        if self.rank == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._rendezvous(version=None, members=[])
        dist.barrier(group=host_group)

    def _rendezvous(self, version: int | None, members: list[dict[str, int]]) -> None:
        _write_json(
            self.path,
            {
                "id": self.id,
                "host": self.host,
                "port": self.port,
                "stages": self.stages,
                "backend": self.backend,
                "version": version,  # the newest version sent (informational)
                "members": members,  # who received it
            },
        )

    def _members(self, version: int) -> list[dict[str, int]]:
        """Rank 0: announces `version` and closes the round once every configured worker
        joined or join_wait_s passed; the members in join order."""
        self.store.set("announce", str(version))
        deadline = time.monotonic() + self.join_wait_s
        while self.store.add(f"join/{version}", 0) < self.workers:
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        joined = self.store.add(f"join/{version}", 0)
        # Joins after this count are refused by close/V (they see their index past it).
        members = [json.loads(self.store.get(f"member/{version}/{i}")) for i in range(joined)]
        self.store.set(f"close/{version}", json.dumps(members))
        return members

    def send(
        self, version: int, weights: Callable[[], Iterator[tuple[str, torch.Tensor]]]
    ) -> dict[str, float]:
        """Version `version` to the workers present (collective over the trainer's ranks;
        `weights()`: this rank's iterator of HF-named full tensors, e.g. `hf_weights`, which
        every TP rank of a stage must drive). Returns the round's numbers; `bus_ok` 0 when a
        member failed or a configured worker was absent (publish the files then)."""
        start = time.perf_counter()
        members: list[Any] = [self._members(version) if self.rank == 0 else None]
        dist.broadcast_object_list(members, src=0, group=self.host_group)
        present = members[0]
        sent_bytes, failed = 0, False
        if present and self.gathers:
            size = 1 + sum(m["procs"] for m in present)
            sent_bytes, failed = self._stream(version, size, weights())
        # Host-side numbers (gloo), summed: any failure, and the bytes of every stage.
        totals = torch.tensor([float(failed), float(sent_bytes)], device="cpu")
        dist.all_reduce(totals, group=self.host_group)
        failures, model_bytes = totals.tolist()
        ok = bool(present) and failures == 0 and len(present) >= self.workers
        if self.rank == 0:
            if present and failures == 0:
                self._rendezvous(version, present)
            self._forget(version - 1)
        seconds = time.perf_counter() - start
        return {
            "bus_seconds": seconds,
            "bus_members": float(len(present)),
            "bus_ok": float(ok),
            # what each member received, per second of the round (joining included)
            "bus_gbytes_per_s": model_bytes / seconds / 1e9,
        }

    def _forget(self, version: int) -> None:
        """An older round's keys (its layouts went with its streams)."""
        if not self.store.check([f"close/{version}"]):
            return
        joined = self.store.add(f"join/{version}", 0)
        for key in (f"join/{version}", f"close/{version}"):
            self.store.delete_key(key)
        for i in range(joined):
            self.store.delete_key(f"member/{version}/{i}")

    def _stream(
        self, version: int, size: int, weights: Iterator[tuple[str, torch.Tensor]]
    ) -> tuple[int, bool]:
        """This stage's tensors in buckets (the sender), or only the gathers (other TP ranks).
        A failure aborts the group at once and stops the broadcasts, not the gathers the
        stage's other ranks wait in."""
        prefix = f"v/{version}/{self.stage}/"
        group, pending, sent, failed = None, None, 0, False
        if self.sends:
            try:
                group = _group(self.store, prefix, 0, size, self.backend, self.timeout_s)
            except Exception as e:  # noqa: BLE001 - a member gone before the round began
                print(f"weight bus: version {version}: no group ({e})", flush=True)
                failed = True
        k = 0

        def fail(e: Exception) -> None:
            nonlocal failed
            print(f"weight bus: version {version}: {type(e).__name__}: {e}", flush=True)
            failed = True
            _abort(group)  # now, not after the stage's remaining gathers

        def send(flat: torch.Tensor, layout: list[list[Any]]) -> None:
            nonlocal pending, sent, k
            if pending is not None:
                _wait(pending, self.timeout_s)  # the previous buffer is free again
            self.store.set(f"{prefix}m{k}", json.dumps({"n": flat.numel(), "t": layout}))
            pending = _broadcast(group, flat)  # the next one fills meanwhile
            sent += flat.numel()
            k += 1

        packer = _Packer(self.half_bytes)
        for name, tensor in weights:  # every TP rank of the stage drives the gathers
            if not self.sends or failed:
                continue
            try:
                for flat, layout in packer.add(name, tensor):
                    send(flat, layout)
            except Exception as e:  # noqa: BLE001 - a member died: the round fails, not training
                fail(e)
        if self.sends and not failed:
            try:
                for flat, layout in packer.flush():
                    send(flat, layout)
                if pending is not None:
                    _wait(pending, self.timeout_s)
                self.store.set(f"{prefix}m{k}", json.dumps({"n": 0, "t": []}))  # the end
            except Exception as e:  # noqa: BLE001
                fail(e)
        if self.sends:
            # The previous round's layouts: read by now, or never will be (this round's end
            # marker may still be unread by a member).
            for key in self._layouts:
                self.store.delete_key(key)
            self._layouts = [f"{prefix}m{i}" for i in range(k + 1)]
        return sent, failed


# --- the workers' side ------------------------------------------------------------------------


class BusReceiver:
    """A rollout worker's end: finds the trainer's bus through the run directory and joins
    the rounds of versions newer than its engine's."""

    def __init__(self, run_dir: Path, worker: int, procs: int, timeout_s: float) -> None:
        self.path = Path(run_dir) / "weights" / RENDEZVOUS
        self.worker, self.procs, self.timeout_s = worker, procs, timeout_s
        self.id: str | None = None
        self.store: Any = None
        self.info: dict[str, Any] = {}

    def _connect(self) -> bool:
        """(Re)connects when the trainer (re)started; False while there is no bus."""
        try:
            info = json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return False
        if info["id"] != self.id:
            self.store, self.id = None, None
            # The file outlives its trainer (a requeued trainer rewrites it only once it is
            # up again). torch's TCPStore client retries a refused connection until its
            # timeout: 120 s of a worker's time, each time it looked, lost to a dead trainer
            # (CI saw workers stall for minutes after a requeue). A plain connection first:
            # a dead trainer's port refuses at once.
            try:
                socket.create_connection((info["host"], info["port"]), CONNECT_S).close()
                store = _store(info["host"], info["port"], CONNECT_S)
            except Exception:  # noqa: BLE001 - a trainer gone since it wrote the file
                return False
            # timeout_s bounds every wait on the store, the close of a round joined included
            # (the trainer may wait join_wait_s for the others first).
            store.set_timeout(timedelta(seconds=self.timeout_s))
            self.store, self.id, self.info = store, info["id"], info
        return True

    def announced(self) -> int | None:
        """The newest version the trainer has announced, None without a bus."""
        if not self._connect():
            return None
        try:
            if not self.store.check(["announce"]):
                return None
            return int(self.store.get("announce"))
        except Exception:  # noqa: BLE001 - the trainer went away: reconnect next time
            self.id = None
            return None

    def join(self, version: int) -> Round | None:
        """Joins the round of `version` if it is still open; None if it closed without us."""
        store = self.store
        if store.check([f"close/{version}"]):
            return None
        index = store.add(f"join/{version}", 1) - 1
        store.set(
            f"member/{version}/{index}", json.dumps({"worker": self.worker, "procs": self.procs})
        )
        members = json.loads(store.get(f"close/{version}"))
        if index >= len(members):
            return None
        info = self.info
        return Round(
            host=info["host"],
            port=info["port"],
            version=version,
            stages=info["stages"],
            first_rank=1 + sum(m["procs"] for m in members[:index]),
            size=1 + sum(m["procs"] for m in members),
            backend=info["backend"],
            timeout_s=self.timeout_s,
        )


def _engine_rank() -> int:
    """This process's rank in its vLLM engine (0 for an engine of one process, and where no
    engine runs: a process that only drains the stream)."""
    try:
        from vllm.distributed import parallel_state

        return parallel_state.get_tensor_model_parallel_rank()
    except (ImportError, AssertionError):
        return 0


def receive(round_: Round) -> Iterator[tuple[str, torch.Tensor]]:
    """Runs in each engine process (through VLLMGenerator.update_weights_from): the version's
    HF-named tensors as they arrive, stage by stage, every tensor whole (vLLM's loader takes
    its own tensor-parallel slice). Raises BusError if the round fails."""
    engine_rank = _engine_rank()
    device = torch.device("cpu")
    if round_.backend == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    store = _store(round_.host, round_.port, round_.timeout_s)
    rank = round_.first_rank + engine_rank
    groups = []
    try:
        for stage in range(round_.stages):  # every stage's sender waits for its group
            prefix = f"v/{round_.version}/{stage}/"
            groups.append(
                _group(store, prefix, rank, round_.size, round_.backend, round_.timeout_s)
            )
        for stage, group in enumerate(groups):
            prefix = f"v/{round_.version}/{stage}/"

            def post(k: int) -> tuple[torch.Tensor, Any, list[list[Any]]] | None:
                """Bucket k's receive, posted (None past the stage's last bucket)."""
                bucket = json.loads(store.get(f"{prefix}m{k}"))  # noqa: B023 - used at once
                if bucket["n"] == 0:
                    return None
                # A buffer per bucket: the engine may hold the tensors until a layer is whole.
                flat = torch.empty(bucket["n"], dtype=torch.uint8, device=device)
                return flat, _broadcast(group, flat), bucket["t"]  # noqa: B023

            k, current = 0, post(0)
            while current is not None:
                flat, work, layout = current
                _wait(work, round_.timeout_s)
                # The next bucket arrives while the engine loads this one.
                current = post(k + 1)
                yield from _unpack(flat, layout)
                k += 1
    except Exception as e:
        for group in groups:
            _abort(group)
        raise BusError(f"weight bus, version {round_.version}: {type(e).__name__}: {e}") from e
