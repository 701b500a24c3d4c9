"""Training checkpoints: resume at the same layout is megatron's parallel load and continues
bit for bit; at another layout it reshards and gives the uninterrupted run's next update;
without the distributed optimizer too; a save killed half-way leaves the previous checkpoint
and `latest` intact; a full disk is said in one line and leaves nothing behind."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import torch

from rlef_hpc.checkpoint import training
from rlef_hpc.checkpoint.convert import CheckpointError
from tests.helpers import TESTS_DIR, require, script, torchrun_command
from tests.helpers import torchrun as torchrun_script

SCRIPT = script("ppo_resume")


def command(nproc: int, *args: object) -> tuple[list[str], dict[str, str]]:
    return torchrun_command(SCRIPT, nproc, *args)


def torchrun(nproc: int, *args: object) -> None:
    torchrun_script(SCRIPT, nproc, *args)


@pytest.fixture(scope="module")
def init(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("init") / "init.pt"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(TESTS_DIR.parent),
        "MASTER_PORT": str(port),
    }
    proc = subprocess.run(
        [sys.executable, str(script("ppo_update")), "--make-init", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return path


@pytest.mark.multiprocess
def test_resume_at_other_layouts_matches_the_uninterrupted_run(init, tmp_path):
    torchrun(1, "--init", init, "--steps", 3, "--metrics", tmp_path / "straight.pt")
    run = tmp_path / "run"
    # Saved asynchronously: committed only once the background writes are finalized.
    torchrun(4, "--tp", 2, "--pp", 2, "--init", init, "--steps", 1, "--save", run, "--async-save")
    assert training.latest(run).name == "iter_0000001"
    # A training checkpoint exports like a model checkpoint.
    export = subprocess.run(
        [
            sys.executable,
            str(TESTS_DIR.parent / "tools" / "convert_to_hf.py"),
            str(training.latest(run)),
            str(tmp_path / "hf"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert export.returncode == 0, export.stderr[-3000:]
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    straight = torch.load(tmp_path / "straight.pt")
    for nproc, layout in ((1, ()), (2, ())):  # TP1 x PP1, then DP=2
        out = tmp_path / f"resumed{nproc}.pt"
        # Two more updates: the second one's losses depend on the restored Adam moments, step
        # counts and LR schedule, not only on the restored weights.
        torchrun(
            nproc, *layout, "--resume", run, "--steps", 2, "--metrics", out,
            "--expect-load", "reshard",
        )  # fmt: skip
        resumed = torch.load(out)
        for key in ("policy_loss", "value_loss", "approx_kl", "entropy", "policy_grad_norm"):
            assert resumed[key] == pytest.approx(straight[key], abs=1e-5), (nproc, key)


def content_metadata(path: Path) -> dict:
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_content_metadata(str(path))


def assert_same_state(a: Path, b: Path, nproc: int) -> None:
    """Each rank's optimizer state dumps (ppo_resume --dump) equal, bit for bit."""
    for rank in range(nproc):
        x, y = torch.load(f"{a}.{rank}"), torch.load(f"{b}.{rank}")
        assert x.keys() == y.keys() == {"policy", "value"}
        for name in x:
            main_x, main_y = x[name]["main"], y[name]["main"]
            assert len(main_x) == len(main_y) > 0
            for p, q in zip(main_x, main_y, strict=True):
                assert torch.equal(p, q), (rank, name)
            sx, sy = x[name]["adam"], y[name]["adam"]
            # Megatron's load copies the saved groups' step count (the per-parameter "step"
            # tensors, compared below, are what torch's Adam uses) into each group.
            groups_x, groups_y = (
                [{k: v for k, v in g.items() if k != "step"} for g in s["param_groups"]]
                for s in (sx, sy)
            )
            assert groups_x == groups_y, (rank, name)
            assert sx["state"].keys() == sy["state"].keys()
            for i, state in sx["state"].items():
                assert state.keys() == sy["state"][i].keys() == {"step", "exp_avg", "exp_avg_sq"}
                for k, v in state.items():
                    assert torch.equal(v, sy["state"][i][k]), (rank, name, i, k)


@pytest.mark.multiprocess
def test_resume_at_the_same_layout_is_parallel_and_bit_identical(init, tmp_path):
    # DP=2: both ranks hold a shard of each optimizer's state.
    torchrun(
        2, "--init", init, "--steps", 3, "--metrics", tmp_path / "straight.pt",
        "--dump", tmp_path / "straight",
    )  # fmt: skip
    run = tmp_path / "run"
    # The save fails if any optimizer state is gathered onto one rank.
    torchrun(
        2, "--init", init, "--steps", 1, "--save", run, "--forbid-gather",
        "--dump", tmp_path / "saved",
    )  # fmt: skip
    content = content_metadata(training.latest(run) / "policy")
    assert content["optimizer_format"] == "distributed"  # megatron's dp_reshardable
    assert content["layout"] == {
        "tp": 1, "pp": 1, "dp": 2, "cp": 1, "bucket_layouts": 1,
    }  # fmt: skip
    # Megatron's parallel load (each rank reads its shard), then two more updates.
    torchrun(
        2, "--resume", run, "--steps", 2, "--metrics", tmp_path / "resumed.pt",
        "--expect-load", "parallel", "--dump-loaded", tmp_path / "loaded",
        "--dump", tmp_path / "resumed",
    )  # fmt: skip
    assert_same_state(tmp_path / "saved", tmp_path / "loaded", 2)
    assert_same_state(tmp_path / "straight", tmp_path / "resumed", 2)
    assert torch.load(tmp_path / "resumed.pt") == torch.load(tmp_path / "straight.pt")
    # DP=1 is the same bucket layout: megatron's format reshards over DP itself.
    torchrun(
        1, "--resume", run, "--steps", 2, "--metrics", tmp_path / "dp1.pt",
        "--expect-load", "parallel",
    )  # fmt: skip
    dp1, straight = torch.load(tmp_path / "dp1.pt"), torch.load(tmp_path / "straight.pt")
    for key in ("policy_loss", "value_loss", "approx_kl", "entropy", "policy_grad_norm"):
        assert dp1[key] == pytest.approx(straight[key], abs=1e-5), key


@pytest.mark.multiprocess
def test_a_run_without_the_distributed_optimizer_resumes(init, tmp_path):
    """optim.distributed_optimizer=false: megatron's per-parameter optimizer state (global
    shapes) resumes bit for bit at the same layout, and at another one as the uninterrupted
    run; a checkpoint resumed with the other setting is refused in words."""
    plain = "--plain-optimizer"
    torchrun(2, "--init", init, "--steps", 3, "--metrics", tmp_path / "straight.pt", plain)
    run = tmp_path / "run"
    torchrun(2, "--init", init, "--steps", 1, "--save", run, plain)
    content = content_metadata(training.latest(run) / "policy")
    assert content["optimizer_format"] == "model_space"
    torchrun(
        2, "--resume", run, "--steps", 2, "--metrics", tmp_path / "resumed.pt", plain,
        "--expect-load", "model_space",
    )  # fmt: skip
    straight = torch.load(tmp_path / "straight.pt")
    assert torch.load(tmp_path / "resumed.pt") == straight
    torchrun(
        2, "--tp", 2, "--resume", run, "--steps", 2, "--metrics", tmp_path / "tp2.pt", plain,
        "--expect-load", "model_space",
    )  # fmt: skip
    tp2 = torch.load(tmp_path / "tp2.pt")
    for key in ("policy_loss", "value_loss", "approx_kl", "entropy", "policy_grad_norm"):
        assert tp2[key] == pytest.approx(straight[key], abs=1e-5), key
    cmd, env = command(1, "--resume", run, "--steps", 1)  # with the distributed optimizer
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert (
        "iter_0000001: saved with optim.distributed_optimizer=false, this run has true: "
        "resume it as saved" in proc.stderr
    )


@pytest.mark.multiprocess
def test_a_save_killed_half_way_leaves_the_previous_checkpoint(init, tmp_path):
    run = tmp_path / "run"
    cmd, env = command(2, "--init", init, "--steps", 1, "--save", run, "--hang-at", 2)
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    deadline = time.monotonic() + 300
    while not (run / "HANGING").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    # In the middle of saving iteration 2. torchrun starts each rank in a session of its own:
    # the ranks are killed one by one (their helpers then end with them).
    ranks = psutil.Process(proc.pid).children()
    os.killpg(proc.pid, signal.SIGKILL)
    for rank in ranks:
        rank.kill()
    proc.wait()
    assert (run / ".tmp-iter_0000002").exists()  # the partial save
    assert not (run / "iter_0000002").exists()
    assert training.latest(run).name == "iter_0000001"
    # And it still loads (DP=1 this time), continuing from iteration 1.
    torchrun(1, "--resume", run, "--steps", 1, "--metrics", tmp_path / "after.pt", "--save", run)
    assert training.latest(run).name == "iter_0000002"
    assert not (run / ".tmp-iter_0000002").exists()  # the next save cleared the leftovers


def test_not_a_checkpoint(tmp_path):
    assert training.latest(tmp_path) is None
    (tmp_path / "latest").write_text("5\n")
    with pytest.raises(
        CheckpointError, match="points to iter_0000005, which is not a complete checkpoint"
    ):
        training.latest(tmp_path)


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Callable[[int], Path]]:
    """Size-limited tmpfs filesystems (root only), unmounted after the test."""
    mounts: list[Path] = []

    def make(kilobytes: int) -> Path:
        path = tmp_path / f"disk{len(mounts)}"
        path.mkdir()
        options = f"size={kilobytes}k"
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
        )
        require(proc.returncode == 0, f"cannot mount a tmpfs here (root only): {proc.stderr}")
        mounts.append(path)
        return path

    yield make
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], check=False)


def save_on(disk: Path, init: Path, steps: int, *args: object) -> tuple[str, str]:
    """ppo_resume saving every step into DISK/run; its terminal output and the one line a
    failed save said."""
    error = disk.parent / f"{disk.name}.error"
    cmd, env = command(
        1, "--init", init, "--steps", steps, "--save", disk / "run", "--save-error", error, *args
    )
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, error.read_text() if error.exists() else ""


@pytest.mark.multiprocess
def test_a_full_disk_is_said_in_one_line_and_leaves_nothing_behind(init, small_disk):
    # Smaller than one checkpoint (5.6 MB at this model): the first save fails as it writes.
    disk = small_disk(3000)
    out, error = save_on(disk, init, 1, "--check-space", 2)
    # Foreseen at the start, from the models (no checkpoint yet to measure).
    assert re.search(
        rf"warning: {disk} \(tmpfs\) has 3\.1 MB free; run\.keep_last=2 with checkpoints of "
        r"about \d\.\d MB needs \d+\.\d MB more \(2 kept and one being written\): a save will "
        "fail when it fills",
        out,
    ), out
    assert re.fullmatch(
        rf"checkpoint iter_0000001 not saved: no space left on {disk} \(tmpfs\): it needs more "
        r"than \d\.\d MB, 3\.1 MB was free; no earlier checkpoint",
        error,
    ), error
    assert list((disk / "run").iterdir()) == []  # the partial save is gone, its space free
    assert shutil.disk_usage(disk).used < 100_000

    # Room for one checkpoint and a killed save's leftover: the leftover goes at the first
    # save, the second save is refused before it writes anything.
    disk = small_disk(6500)
    leftover = disk / "run" / ".tmp-iter_0000007"
    leftover.mkdir(parents=True)
    (leftover / "part").write_bytes(bytes(1_000_000))
    _, error = save_on(disk, init, 2)
    assert re.fullmatch(
        rf"checkpoint iter_0000002 not saved: no space left on {disk} \(tmpfs\): it needs "
        r"about 5\.\d MB, \d+\.\d KB was free; iter_0000001 is intact \(details: the run's log\)",
        error,
    ), error
    assert sorted(p.name for p in (disk / "run").iterdir()) == ["iter_0000001", "latest"]
    assert training.latest(disk / "run").name == "iter_0000001"
