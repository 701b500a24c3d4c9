"""What the tests share besides fixtures (those are in conftest.py): where things are, how a
test launches a process of its own (a script under torchrun, a tool), the tiny model and
training configs, and how a missing prerequisite fails under CI and skips elsewhere."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import psutil
import pytest

TESTS_DIR = Path(__file__).parent
# The programs tests launch in processes of their own (under torchrun or alone): script(name).
SCRIPTS_DIR = TESTS_DIR / "scripts"


def script(name: str) -> Path:
    """tests/scripts/NAME.py, the one way tests locate a script they launch."""
    path = SCRIPTS_DIR / f"{name}.py"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SCRIPTS_DIR.glob("*.py")))
        raise FileNotFoundError(f"no test script {path} (there are: {known})")
    return path


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(condition: bool, reason: str) -> None:
    if condition:
        return
    if in_ci():
        pytest.fail(f"CI requires: {reason}")
    pytest.skip(reason)


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


def torchrun_command(path: object, nproc: int, *args: object) -> tuple[list[str], dict[str, str]]:
    """torchrun of a script on loopback gloo, with the repository and tests/scripts/ importable."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{TESTS_DIR.parent}:{SCRIPTS_DIR}"}
    return [*torchrun_launcher(nproc), str(path), *map(str, args)], env


def torchrun(path: object, nproc: int, *args: object, timeout: int = 600) -> None:
    import subprocess

    cmd, env = torchrun_command(path, nproc, *args)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def run_script(path: object, *args: object, timeout: int = 600, env: dict[str, str] | None = None):
    """A Python script in a process of its own (one thread, its own gloo port, the repository
    importable); returns the completed process, output captured. `env`: variables to set on
    top of this process's (PATH without Slurm's commands, say)."""
    import subprocess
    import sys

    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MASTER_PORT": str(free_port()),
        "PYTHONPATH": str(TESTS_DIR.parent),
        **(env or {}),
    }
    cmd = [sys.executable, str(path), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def run_tool(name: str, *args: object, timeout: int = 300, env: dict[str, str] | None = None):
    """tools/NAME as a user runs it."""
    return run_script(TESTS_DIR.parent / "tools" / name, *args, timeout=timeout, env=env)


# What a training iteration reports that does not depend on how fast it ran: the numbers two
# runs of the same training (resumed, or another layout) must agree on.
ITERATION_NUMBERS = (
    "reward_mean",
    "success_rate",
    "response_tokens",
    "policy_loss",
    "value_loss",
    "kl",
)

# A training run in seconds: a tiny Llama and tokenizer, a few problems, a short warm start.
TINY_TRAIN = [
    "model.hidden_size=64",
    "model.num_layers=2",
    "model.num_attention_heads=2",
    "model.num_query_groups=1",
    "model.ffn_hidden_size=128",
    "model.tokenizer_vocab=400",
    "data.train_problems=24",
    "data.valid_problems=4",
    "data.test_problems=2",
    "warmstart.steps=30",
    "warmstart.warmup_steps=10",  # the demo's 40 would outlast these 30 steps
    "rollout.rollouts_per_iteration=16",
    "rollout.samples_per_problem=2",
    "rollout.max_tokens=40",
    "update.num_minibatches=2",
    "eval.rollouts_per_problem=1",
    "eval.metrics=[{name: 1@3}]",  # one rollout per problem estimates 1@3 only
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
    return save_random_model(path, "llama", tokenizer, transformers_init=True, **shape)


def random_config(family: str, tokenizer=None, **shape):
    """The transformers config of a random model of `family` ("llama", "qwen2", "qwen3"): the
    tiny default shape (TINY_LLAMA) updated by `shape`; the vocabulary the tokenizer's, padded
    to even, with its special token ids (without one: 256 tokens)."""
    from transformers import AutoConfig

    vocab = {"vocab_size": 256}
    if tokenizer is not None:
        vocab = {
            "vocab_size": len(tokenizer) + len(tokenizer) % 2,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        }
    fields = {"tie_word_embeddings": False, **vocab, **TINY_LLAMA, **shape}
    return AutoConfig.for_model(family, **fields)


def save_random_model(path, family: str, tokenizer=None, transformers_init=False, **shape):
    """A random (seed 0) Hugging Face model of `family` in `path` (random_config's), with
    `tokenizer` if given. Every tensor is random, norms and biases too (transformers makes
    those ones and zeros, which a mapping could swap or drop unseen), unless
    `transformers_init`."""
    import torch
    from transformers import AutoModelForCausalLM

    config = random_config(family, tokenizer, **shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if transformers_init:
                break
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def live_processes(processes: Iterable[psutil.Process]) -> list[psutil.Process]:
    """Those of `processes` still running: neither gone nor zombies."""

    def running(p: psutil.Process) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    return [p for p in processes if running(p)]


def kill_tree(proc: Any) -> None:
    """SIGKILLs a process a test started (a subprocess.Popen) and every process under it: a
    torchrun killed alone leaves its ranks running, orphaned, past the test."""
    try:
        tree = psutil.Process(proc.pid)
        processes = [*tree.children(recursive=True), tree]
    except psutil.NoSuchProcess:
        processes = []
    for p in processes:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def describe_processes(processes: Iterable[psutil.Process]) -> str:
    lines = []
    for p in processes:
        try:
            lines.append(f"pid {p.pid}: {' '.join(p.cmdline())[:200]}")
        except psutil.Error:
            lines.append(f"pid {p.pid}: (gone)")
    return "\n".join(lines)


def trajectory(name: str, correct: bool, turns: int) -> Any:
    """A judged episode of `turns` turns without a model, for the evaluation's arithmetic: only
    the last turn passes the public tests, when the answer is correct (the episode stops
    there)."""
    from rlef_hpc.data.trajectory import Trajectory, Turn

    made = [
        Turn(0, 1, 2, [0.0], f"t{t}", f"print({t})", True, passed_public=correct and t == turns)
        for t in range(1, turns + 1)
    ]
    return Trajectory(name, "python", [0, 1, 2], made, success=correct)


def eval_result(
    iteration: int,
    means: dict[str, dict[str, float]],
    spread: float = 0.05,
    bounds: tuple[float, float] | None = None,
) -> Any:
    """A recorded evaluation without a model: `means` = {set: {metric: mean}}, each interval
    mean +- `spread` (or `bounds`), 10 problems, one sampling per set."""
    from rlef_hpc.eval.results import CheckpointResult, Estimate, SamplingResult, SetResult

    sets = {}
    for name, metrics in means.items():
        estimates = {
            m: Estimate(mean, *(bounds or (mean - spread, mean + spread)), 10, 0.2, 0.95)
            for m, mean in metrics.items()
        }
        sampling = SamplingResult(0.2, 0.95, 1, 10, sorted(metrics), [], [0.0], 1.0, 10.0)
        sets[name] = SetResult(10, estimates, [sampling])
    name = "init" if iteration == 0 else f"iter_{iteration:07d}"
    return CheckpointResult(iteration, name, sets, 0.0)
