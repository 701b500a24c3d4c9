"""Shared fixtures. A test that needs something this machine lacks fails under CI (CI=true)
and is skipped, with the reason printed, on a developer's machine."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import psutil
import pytest

# Set before any executor starts: the hostile suite checks that no test can read it.
os.environ["RLEF_TEST_SECRET"] = "hunter2-do-not-leak"


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(condition: bool, reason: str) -> None:
    if condition:
        return
    if in_ci():
        pytest.fail(f"CI requires: {reason}")
    pytest.skip(reason)


def live_processes(processes: Iterable[psutil.Process]) -> list[psutil.Process]:
    """Those of `processes` still running: neither gone nor zombies."""

    def running(p: psutil.Process) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    return [p for p in processes if running(p)]


def describe_processes(processes: Iterable[psutil.Process]) -> str:
    lines = []
    for p in processes:
        try:
            lines.append(f"pid {p.pid}: {' '.join(p.cmdline())[:200]}")
        except psutil.Error:
            lines.append(f"pid {p.pid}: (gone)")
    return "\n".join(lines)


# How long the suite's leftover processes get to end after the last test: helpers that watch
# their parent poll it a few times a second.
LEFTOVER_GRACE_S = 5.0
PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind() -> Iterator[None]:
    """At the end of the session, nothing the tests started may still run (a leak here is a
    process that outlives every run of the suite): fails under CI, warns elsewhere. Set up
    first, so torn down after every other session fixture (the shared executor's workers).
    This process becomes a child subreaper (Linux): the orphans of the tests' processes (a
    helper of a trainer that a test ran, and killed) come to it instead of to init, and so are
    among its descendants."""
    import sys

    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    yield
    import multiprocessing
    import time
    import warnings
    from multiprocessing import resource_tracker

    # This process's own multiprocessing children and resource tracker: multiprocessing ends
    # them when this process exits (the tracker at the end of its pipe).
    own = {p.pid for p in multiprocessing.active_children()}
    own.add(getattr(resource_tracker._resource_tracker, "_pid", None))
    deadline = time.monotonic() + LEFTOVER_GRACE_S
    while True:
        left = [p for p in live_processes(psutil.Process().children(True)) if p.pid not in own]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if left:
        message = (
            f"processes started by the tests still run {LEFTOVER_GRACE_S:.0f} s after the "
            f"last one:\n{describe_processes(left)}"
        )
        if in_ci():
            pytest.fail(message)
        warnings.warn(message, stacklevel=1)


@pytest.fixture(scope="session")
def executor() -> Iterator[object]:
    from rlef_hpc import sandbox

    caps = sandbox.capabilities()
    require(caps["seccomp"], "seccomp filters are unavailable on this kernel")
    with sandbox.Executor(workers=2) as ex:
        yield ex


TESTS_DIR = __import__("pathlib").Path(__file__).parent


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_launcher(nproc: int) -> list[str]:
    """torchrun with `nproc` processes on loopback, on a free port; the program follows."""
    import sys

    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
    ]


def torchrun_command(worker: object, nproc: int, *args: object) -> tuple[list[str], dict[str, str]]:
    """torchrun of a test worker script on loopback gloo, with the repo and tests importable."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{TESTS_DIR.parent}:{TESTS_DIR}"}
    return [*torchrun_launcher(nproc), str(worker), *map(str, args)], env


def torchrun(worker: object, nproc: int, *args: object, timeout: int = 600) -> None:
    import subprocess

    cmd, env = torchrun_command(worker, nproc, *args)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def run_script(path: object, *args: object, timeout: int = 600):
    """A Python script in a process of its own (one thread, its own gloo port, the repository
    importable); returns the completed process, output captured."""
    import subprocess
    import sys

    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MASTER_PORT": str(free_port()),
        "PYTHONPATH": str(TESTS_DIR.parent),
    }
    cmd = [sys.executable, str(path), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def run_tool(name: str, *args: object, timeout: int = 300):
    """tools/NAME as a user runs it."""
    return run_script(TESTS_DIR.parent / "tools" / name, *args, timeout=timeout)


# A training run in seconds: a tiny Llama and tokenizer, a few problems, a short warm start.
TINY_TRAIN = [
    "model.hidden_size=64",
    "model.num_layers=2",
    "model.num_attention_heads=2",
    "model.num_query_groups=1",
    "model.ffn_hidden_size=128",
    "model.tokenizer_vocab=400",
    "data.train_problems=24",
    "data.eval_problems=4",
    "warmstart.steps=30",
    "rollout.rollouts_per_iteration=16",
    "rollout.samples_per_problem=2",
    "rollout.max_tokens=40",
    "update.num_minibatches=2",
    "update.micro_batch_size=4",
    "eval.rollouts_per_problem=1",
    "optim.lr=1e-4",
    "optim.warmup_steps=2",
    "run.tensorboard=true",
]


TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=2048,
)


def save_random_llama(path, tokenizer, **shape):
    """A randomly initialised (seed 0) Hugging Face Llama with `tokenizer` in `path`: the
    vocabulary is the tokenizer's, padded to even (tensor parallelism of 2 divides it),
    embeddings untied as in Llama 3.1; `shape` overrides the tiny default (hidden 64, ...)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer) + len(tokenizer) % 2,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **{**TINY_LLAMA, **shape},
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
