"""One prepared check of the trainer path on one GPU: the product's own code, world size 1.

    python benchmarks/gpu_check.py [--device cuda|cpu] [--steps 3] [--out PATH] [--set KEY=VALUE]

On CUDA (NCCL, bf16, megatron's local layer spec, ~1B Llama-shaped, random init): builds the
policy, value and reference models; collates a batch of 1-3-turn trajectories of a few
thousand tokens and runs `PPOUpdate.step` with the loop's host-side collectives around it
(episode metrics averaged over ranks, the stop flag); the warm start; chunked against naive
token log-probs (values and peak memory); streaming the policy out as HF tensors; the memory
plan (rlef_hpc.launch.plan) against the measured peak; tokens/s and MFU of the update against
a bf16 matmul rate measured in the same run; the weight bus (rlef_hpc.rollout.bus) to a
receiver in a child process, a round and then a round whose receiver is killed (over NCCL
where there are two GPUs: NCCL refuses two ranks of a group on one device), and on CUDA the
bus's NCCL failure handling: a stalled bus broadcast in a child process with torch's default
NCCL settings around it, which must fail the round and leave the process running, beside a
control made as torch's default group (which torch's watchdog ends). `--device cpu` runs the
same checks on a tiny shape over gloo in float32 (all but the NCCL one), so that CI keeps this
script working (tests/test_gpu_check.py).

Prints one table and writes it as JSON (default $OUT/gpu_check.json where OUT is set, else
/tmp/gpu_check.json); exits 1 if any check failed. A check that raises is recorded as failed
and the others still run (those that need its result are marked skipped). `--set` takes the
dotted overrides of the JobConfig that defines the shape and layout (e.g. `--set
precision.recompute=null`); see GPU_SHAPE below.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

# The device shape: Llama-3.2-1B's (hidden 2048, 16 layers, GQA 32/8, SwiGLU 8192, Llama 3's
# vocabulary) with untied embeddings as the product builds them (1.5B parameters), bf16. The
# longest episode the plan assumes is max_turns x (max_tokens + 1024 prompt tokens) = 6144;
# the batch's longest trajectory is made exactly that long, so the plan and the run agree on
# the sequence. Full recomputation (COMMON): without Transformer Engine the local spec's
# attention is unfused and keeps [heads, s, s] probabilities per layer (~7 GB at 6144 tokens),
# which for 16 layers next to 57 GB of model states would not fit 139 GB.
GPU_SHAPE = [
    "model.hidden_size=2048",
    "model.num_layers=16",
    "model.num_attention_heads=32",
    "model.num_query_groups=8",
    "model.ffn_hidden_size=8192",
    "model.tokenizer_vocab=128256",
    "model.max_position_embeddings=8192",
    "precision.dtype=bfloat16",
    "episodes.max_turns=3",
    "rollout.max_tokens=1024",
    "rollout.rollouts_per_iteration=8",
    "rollout.shard_rollouts=8",
    "slurm.gpu_memory_gb=139",
    # one GPU: the plan sizes the log-softmax's chunks as rl/logprobs.py does on a GPU
    "slurm.gpus_per_node=1",
]
# The CPU shape: seconds on 2 cores, float32 (bf16 matmuls on CPUs are slow and not what CI
# should time), two turns so that multi-turn batches are still covered.
CPU_SHAPE = [
    "model.hidden_size=64",
    "model.num_layers=2",
    "model.num_attention_heads=2",
    "model.num_query_groups=1",
    "model.ffn_hidden_size=128",
    "model.tokenizer_vocab=512",
    "model.max_position_embeddings=4096",
    "precision.dtype=float32",
    "episodes.max_turns=2",
    "rollout.max_tokens=64",
    "rollout.rollouts_per_iteration=4",
    "rollout.shard_rollouts=4",
    "slurm.gpu_memory_gb=1",
]
# Both: the trainer-only layout (no engine on the trainer's GPU, so the plan's trainer terms
# are the models and activations alone), two optimizer steps per PPO step as the loop does,
# and full recomputation (the device shape needs it: CI runs the same path).
COMMON = [
    "precision.recompute=full",
    "rollout.layout=disaggregated",
    "rollout.samples_per_problem=4",
    "update.num_minibatches=2",
]
# What the GPU machine does not have: the trainer path must not import any of it.
NOT_ON_DEVICE = ("submitit", "vllm", "transformer_engine", "rlef_hpc.sandbox._executor")
GB = 1024**3
TARGET = 0.15  # planned vs measured memory: reported, not failed, outside this
# The bus check: 16 tensors, each larger than half a bucket (so each is a broadcast of its own:
# a receiver killed after its second has most of the round still to come).
BUS_TENSORS, BUS_BUCKET_MIB, BUS_TIMEOUT_S = 16, 1, 20.0
# The NCCL failure check's children run with torch's default NCCL settings except these waits,
# shortened so that whatever would end a process does so within seconds: torch's watchdog
# rethrows 4 x TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC after a failed work, and the first group's
# heartbeat monitor ends the process TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC after a dump signal
# (ProcessGroupNCCL.cpp, Watchdog::runLoop and HeartbeatMonitor::runLoop). No trace buffer: no
# dump files.
STALL_ENV = {
    "TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC": "250",
    "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": "3",
    "TORCH_NCCL_TRACE_BUFFER_SIZE": "0",
}
STALL_TIMEOUT_S = 2.0  # the stalled group's timeout
# The GPU sleeps 4 s at 2 GHz (an H100 clocks at most 1.98): past the timeout. Its kernel
# cannot be aborted (a dead peer's NCCL kernel can), and aborting the communicator may wait for
# the device, so the failure may show only once it ends.
STALL_CYCLES = 8_000_000_000
SURVIVE_S = 12.0  # after the failure, past every teardown above


class CheckFailed(Exception):
    """A check's condition did not hold."""


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


@dataclass
class Check:
    name: str
    status: str = "skip"  # pass | fail | skip (a check it needs did not pass)
    seconds: float = 0.0
    numbers: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


class Report:
    def __init__(self) -> None:
        self.checks: dict[str, Check] = {}

    def run(self, name: str, fn: Callable[[dict[str, Any]], Any], needs: tuple[str, ...] = ()):
        """fn(numbers) as check `name`; its result, or None if it failed or was skipped."""
        check = self.checks[name] = Check(name)
        missing = [n for n in needs if self.checks[n].status != "pass"]
        if missing:
            check.error = f"needs {', '.join(missing)}"
            return None
        start = time.perf_counter()
        try:
            result = fn(check.numbers)
            check.status = "pass"
            return result
        except Exception as e:  # noqa: BLE001 - one check's failure must not hide the others'
            check.status = "fail"
            check.error = f"{type(e).__name__}: {e}"
            traceback.print_exc()
            return None
        finally:
            check.seconds = time.perf_counter() - start

    @property
    def ok(self) -> bool:
        return all(c.status == "pass" for c in self.checks.values())

    def table(self) -> str:
        lines = ["| check | status | s | numbers |", "|---|---|---|---|"]
        for c in self.checks.values():
            shown = ", ".join(f"{k}={_fmt(v)}" for k, v in c.numbers.items())
            if c.error:
                shown = f"{shown}; {c.error}" if shown else c.error
            lines.append(f"| {c.name} | {c.status} | {c.seconds:.1f} | {shown} |")
        return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# --- measurements ----------------------------------------------------------------------------


class Clock:
    """Seconds of device work: CUDA events on a GPU, perf_counter after the work on a CPU."""

    def __init__(self, device: Any) -> None:
        import torch

        self.cuda = device.type == "cuda"
        self.torch = torch

    def time(self, fn: Callable[[], Any]) -> float:
        if self.cuda:
            start = self.torch.cuda.Event(enable_timing=True)
            end = self.torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        start_s = time.perf_counter()
        fn()
        return time.perf_counter() - start_s


class PeakMemory:
    """The peak bytes a region allocates: torch's allocator statistics on a GPU; on a CPU the
    process's peak resident set above its peak at the start (it never goes down, so a region
    that peaks lower than an earlier one reads 0: on a CPU, a rough figure only)."""

    def __init__(self, device: Any) -> None:
        import torch

        self.cuda = device.type == "cuda"
        self.torch = torch
        self.base = 0

    @staticmethod
    def _rss() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def start(self, relative: bool) -> None:
        """`relative`: count from what is allocated now; else from zero (the whole device)."""
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
            self.base = self.torch.cuda.memory_allocated() if relative else 0
        else:
            self.base = self._rss()

    def peak(self) -> int:
        if self.cuda:
            self.torch.cuda.synchronize()
            return self.torch.cuda.max_memory_allocated() - self.base
        return self._rss() - self.base

    @property
    def source(self) -> str:
        return "cuda.max_memory_allocated" if self.cuda else "ru_maxrss growth"


def matmul_rate(device: Any, dtype: Any, clock: Clock) -> float:
    """FLOP/s of a large square matmul on random data (zeros run faster than real data)."""
    import torch

    n, reps = (8192, 30) if device.type == "cuda" else (512, 10)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):  # warm-up: cuBLAS handles and heuristics stay out of the numbers
        torch.matmul(a, b)
    times = [clock.time(lambda: torch.matmul(a, b)) for _ in range(reps)]
    return 2 * n**3 / statistics.median(times)


def forward_flops(mc: Any, tokens: int, seq: int, value: bool) -> float:
    """Model FLOPs of one forward over `tokens` tokens in sequences of `seq` positions: every
    linear layer's 2 x parameters per token, the attention scores and their application
    (2 x 2 x seq x hidden per token and layer: the local spec's unfused attention computes the
    whole square), the vocabulary projection (a 1-wide head for the value model)."""
    h, kv = mc.hidden_size, mc.num_query_groups * mc.head_dim
    linear = 2 * h * h + 2 * h * kv + 3 * h * mc.ffn_hidden_size
    per_token = mc.num_layers * (2 * linear + 4 * seq * h) + 2 * h * (1 if value else mc.vocab_size)
    return float(per_token * tokens)


def update_flops(mc: Any, tokens: int, seq: int) -> float:
    """Model FLOPs of one PPOUpdate.step: forward-only passes of the policy, the reference and
    the value model, then a forward and backward (3 forwards) of the policy and the value model.
    Recomputation is not counted: MFU counts the model's FLOPs, not the hardware's."""
    policy, value = forward_flops(mc, tokens, seq, False), forward_flops(mc, tokens, seq, True)
    return 2 * policy + value + 3 * (policy + value)


# --- the batch -------------------------------------------------------------------------------


def trajectories(count: int, vocab: int, max_turns: int, max_tokens: int, prompt: int, seed: int):
    """Random RLEF trajectories: 1 to `max_turns` turns of up to `prompt` prompt/feedback and
    `max_tokens` answer tokens; the first one is the longest episode (every turn full), the
    length the memory plan assumes (see `from_shapes` for the rest)."""
    rng = random.Random(seed)
    shapes = []
    for i in range(count):
        turns = []
        for _ in range(max_turns if i == 0 else rng.randint(1, max_turns)):
            p = prompt if i == 0 else rng.randint(prompt // 4, prompt)
            r = max_tokens if i == 0 else rng.randint(max(1, max_tokens // 8), max_tokens)
            turns.append((p, r))
        shapes.append(turns)
    return from_shapes(shapes, vocab, rng)


def from_shapes(shapes: list[list[tuple[int, int]]], vocab: int, rng: random.Random):
    """Trajectories of the given turns ((prompt or feedback tokens, answer tokens) each), of
    random tokens. Behaviour log-probs near a random-init model's own (-log vocab), so that
    the importance weights are not all clipped to nothing; the rewards the paper's (an
    invalid-code penalty, +-1 at the end)."""
    from rlef_hpc.data.trajectory import Trajectory, Turn

    uniform = -math.log(vocab)
    out = []
    for i, turn_shapes in enumerate(shapes):
        turns, tokens = [], []
        for p, r in turn_shapes:
            start = len(tokens)
            tokens += [rng.randrange(vocab) for _ in range(p + r)]
            valid = rng.random() < 0.8
            turns.append(
                Turn(
                    prompt_start=start,
                    prompt_end=start + p,
                    response_end=start + p + r,
                    behaviour_logprobs=[uniform + rng.gauss(0, 0.1) for _ in range(r)],
                    response_text="",
                    code="pass" if valid else None,
                    valid=valid,
                    reward=0.0 if valid else -0.2,
                )
            )
        success = rng.random() < 0.5
        turns[-1].reward += 1.0 if success else -1.0
        out.append(Trajectory(f"p{i}", "python", tokens, turns, success))
    return out


def fingerprint(model: Any) -> list[Any]:
    """A strided sample of every parameter (a few thousand elements each): enough to see that
    an optimizer step moved them, small enough not to count in the measured peak."""
    return [
        p.detach().reshape(-1)[:: max(1, p.numel() // 4096)].clone() for p in model.parameters()
    ]


def moved(model: Any, before: list[Any]) -> float:
    """The fraction of sampled elements that changed since `before`."""
    after = fingerprint(model)
    changed = sum(int((a != b).sum()) for a, b in zip(after, before, strict=True))
    return changed / sum(b.numel() for b in before)


# --- the checks ------------------------------------------------------------------------------


class GpuCheck:
    def __init__(self, cfg: Any, steps: int) -> None:
        import torch

        self.cfg, self.steps, self.torch = cfg, steps, torch
        self.mc = cfg.model.known_shape()
        self.dtype = getattr(torch, cfg.precision.dtype)
        self.models: dict[str, Any] = {}
        self.update: Any = None
        self.step_seconds: list[float] = []
        self.batch_tokens = (0, 0, 0)  # real tokens, padded positions, sequence length

    def setup(self, numbers: dict[str, Any]) -> None:
        import torch.distributed as dist

        from rlef_hpc.dist_env import device, host_group, init_process_groups
        from rlef_hpc.models.megatron_compat import seed

        p = self.cfg.parallel
        init_process_groups(p.tensor, p.pipeline, p.world_size)
        seed(self.cfg.run.seed)
        self.device = device()
        self.clock, self.memory = Clock(self.device), PeakMemory(self.device)
        backend = dist.get_backend()
        numbers.update(
            world_size=dist.get_world_size(),
            backend=backend,
            host_backend=dist.get_backend(host_group()),
        )
        expect(backend == ("nccl" if self.device.type == "cuda" else "gloo"), f"{backend}")

    def matmul(self, numbers: dict[str, Any]) -> None:
        self.peak_flops = matmul_rate(self.device, self.dtype, self.clock)
        numbers["tflops"] = self.peak_flops / 1e12

    def build(self, numbers: dict[str, Any]) -> None:
        from rlef_hpc.models.gpt import build_gpt

        self.memory.start(relative=False)  # the plan counts everything on the trainer GPU
        for kind in ("policy", "value", "reference"):
            model = build_gpt(self.mc, self.cfg.precision, value=kind == "value")
            params = list(model.parameters())
            where = {(q.device.type, q.dtype) for q in params}
            expect(where == {(self.device.type, self.dtype)}, f"{kind} parameters on {where}")
            numbers[f"{kind}_params_b"] = sum(q.numel() for q in params) / 1e9
            self.models[kind] = model
        # The reference is the initial policy, as when the loop loads both from init/: the
        # first step's KL is then zero.
        self.models["reference"].load_state_dict(self.models["policy"].state_dict())

    def ppo(self, numbers: dict[str, Any]) -> None:
        """What one loop iteration does around the update (rlef_hpc/train/loop.py): the
        episode metrics averaged over ranks and the stop flag, over the host (gloo) group; the
        update's own collectives (advantage statistics, token counts, metrics) over NCCL."""

        from rlef_hpc.dist_env import device, mean_over_ranks
        from rlef_hpc.rl.ppo import collate
        from rlef_hpc.rl.update import PPOUpdate
        from rlef_hpc.train.metrics import episode_metrics
        from rlef_hpc.train.preemption import StopFlag

        cfg, torch = self.cfg, self.torch
        self.update = PPOUpdate(
            self.models["policy"],
            self.models["value"],
            self.models["reference"],
            cfg.ppo,
            cfg.optim,
            micro_batch_tokens=cfg.update.micro_batch_tokens,
        )
        before = {k: fingerprint(m) for k, m in self.models.items()}
        metrics: dict[str, float] = {}
        first_kl = math.nan
        with StopFlag(announce=False) as stop:
            for step in range(self.steps):
                trajs = trajectories(
                    cfg.rollout.rollouts_per_iteration,
                    self.mc.vocab_size,
                    cfg.episodes.max_turns,
                    cfg.rollout.max_tokens,
                    self.prompt_tokens,
                    seed=step,
                )
                episodes = mean_over_ranks(episode_metrics(trajs, cfg.episodes.max_turns))
                batch = collate(trajs, device=device())
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                metrics = self.update.step(batch, cfg.update.num_minibatches)
                if self.device.type == "cuda":
                    torch.cuda.synchronize()  # an NCCL or kernel error surfaces here
                self.step_seconds.append(time.perf_counter() - start)
                first_kl = metrics["kl"] if step == 0 else first_kl
                expect(not stop.everywhere(), "stop flag set with no signal")
                bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
                expect(not bad, f"step {step}: non-finite {bad}")
        shape = batch.tokens.shape
        self.batch_tokens = (sum(len(t.tokens) for t in trajs), shape[0] * shape[1], shape[1])
        self.peak_bytes = self.memory.peak()
        moves = {k: moved(m, before[k]) for k, m in self.models.items()}
        expect(moves["policy"] > 0 and moves["value"] > 0, f"weights did not move: {moves}")
        expect(moves["reference"] == 0, f"the frozen reference moved: {moves}")
        numbers.update(
            batch=f"{shape[0]}x{shape[1]}",
            response_tokens=episodes["response_tokens"],
            policy_loss=metrics["policy_loss"],
            value_loss=metrics["value_loss"],
            first_kl=first_kl,
            kl=metrics["kl"],
            policy_grad_norm=metrics["policy_grad_norm"],
            policy_moved=moves["policy"],
            value_moved=moves["value"],
            peak_gb=self.peak_bytes / GB,
            step_s=[round(s, 3) for s in self.step_seconds],
        )

    @property
    def prompt_tokens(self) -> int:
        from rlef_hpc.launch.plan import PROMPT_TOKENS_PER_TURN

        return PROMPT_TOKENS_PER_TURN

    @property
    def longest_episode(self) -> int:
        """The plan's sequence length, which the batch's first trajectory has."""
        turns, answer = self.cfg.episodes.max_turns, self.cfg.rollout.max_tokens
        return turns * (answer + self.prompt_tokens)

    def throughput(self, numbers: dict[str, Any]) -> None:
        """Tokens/s and MFU of the steps after the first (which allocates the optimizer states
        and warms the kernels)."""
        real, padded, seq = self.batch_tokens
        timed = self.step_seconds[1:] or self.step_seconds
        seconds = statistics.median(timed)
        numbers.update(
            tokens_per_s=real / seconds,
            padding=1 - real / padded,
            mfu=update_flops(self.mc, real, seq) / seconds / self.peak_flops,
            mfu_padded=update_flops(self.mc, padded, seq) / seconds / self.peak_flops,
        )

    def plan(self, numbers: dict[str, Any]) -> None:
        from rlef_hpc.launch.plan import plan

        planned = plan(self.cfg)
        terms = {
            "states": planned.trainer["policy weights + grads + optimizer"]
            + planned.trainer["value model weights + grads + optimizer"]
            + planned.trainer["reference policy (frozen)"],
            "activations": planned.trainer["activations"],
        }
        predicted = sum(terms.values())
        ratio = self.peak_bytes / predicted
        numbers.update(
            planned_states_gb=terms["states"] / GB,
            planned_activations_gb=terms["activations"] / GB,
            planned_gb=predicted / GB,
            measured_gb=self.peak_bytes / GB,
            measured_over_planned=ratio,
            within_target=abs(ratio - 1) <= TARGET,
            measured_by=self.memory.source,
        )

    def hf_stream(self, numbers: dict[str, Any]) -> None:
        """The policy as HF-named full tensors (what publishing and refit consume), each
        copied to the host as it comes."""
        from rlef_hpc.checkpoint.hf_dir import hf_weights

        policy = self.update.trainables["policy"].module
        expected = sum(p.numel() * p.element_size() for p in policy.parameters())
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()
        start = time.perf_counter()
        total, count = 0, 0
        for _, tensor in hf_weights(policy, self.mc):
            total += tensor.to("cpu").numel() * tensor.element_size()
            count += 1
        seconds = time.perf_counter() - start
        expect(total == expected, f"streamed {total} bytes, the policy holds {expected}")
        numbers.update(tensors=count, gb=total / GB, seconds=seconds, gb_per_s=total / GB / seconds)

    def release(self) -> None:
        """Drop the PPO models and optimizers before the warm start builds its own."""
        self.update = None
        self.models.clear()
        gc.collect()
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()

    def warm_start(self, numbers: dict[str, Any]) -> None:
        from rlef_hpc.models.gpt import build_gpt
        from rlef_hpc.train.warmstart import warm_start

        rng = random.Random(0)
        length = self.prompt_tokens + self.cfg.rollout.max_tokens
        examples = [
            ([rng.randrange(self.mc.vocab_size) for _ in range(length)], self.prompt_tokens)
            for _ in range(8)
        ]
        model = build_gpt(self.mc, self.cfg.precision)
        before = fingerprint(model)
        losses = warm_start(model, examples, steps=3, batch_size=2, lr=1e-4, seed=0).losses
        expect(all(math.isfinite(x) for x in losses), f"losses {losses}")
        numbers.update(losses=[round(x, 4) for x in losses], moved=moved(model, before))
        expect(numbers["moved"] > 0, "the warm start did not move the weights")

    def logprobs(self, numbers: dict[str, Any]) -> None:
        """Chunked against naive log-probs of one longest episode's logits, forward and
        backward, each one's peak memory above the logits themselves."""
        from rlef_hpc.rl.logprobs import naive_token_logprobs, token_logprobs

        torch = self.torch
        gen = torch.Generator(device=self.device).manual_seed(0)
        n, vocab = self.longest_episode, self.mc.vocab_size
        logits = torch.randn(n, vocab, device=self.device, dtype=self.dtype, generator=gen)
        targets = torch.randint(0, vocab, (n,), device=self.device, generator=gen)
        results = {}
        for name, fn in (("chunked", token_logprobs), ("naive", naive_token_logprobs)):
            leaf = logits.detach().requires_grad_(True)
            self.memory.start(relative=True)
            logp, entropy = fn(leaf, targets)
            logp.sum().backward()
            results[name] = (logp.detach(), entropy.detach(), self.memory.peak())
            del leaf, logp, entropy
        (lc, ec, mc_), (ln, en, mn) = results["chunked"], results["naive"]
        logp_diff = float((lc - ln).abs().max())
        entropy_diff = float((ec - en).abs().max())
        numbers.update(
            tokens=n,
            logp_max_diff=logp_diff,
            entropy_max_diff=entropy_diff,
            chunked_peak_gb=mc_ / GB,
            naive_peak_gb=mn / GB,
            measured_by=self.memory.source,
        )
        expect(logp_diff < 1e-3 and entropy_diff < 1e-3, "chunked and naive differ")

    def bus_rounds(self, numbers: dict[str, Any]) -> None:
        """The weight bus from this process (a trainer's sender, BusSender) to a rollout
        worker's receiver in a child process (`--bus-receiver`): version 1 arrives whole;
        in version 2 the receiver kills itself (SIGKILL) after its second tensor. The round
        must fail within the bus's timeout and this process go on: its own collectives and
        kernels after it."""
        import torch.distributed as dist

        from rlef_hpc.dist_env import host_group
        from rlef_hpc.rollout.bus import BusSender

        torch = self.torch
        two_gpus = self.device.type == "cuda" and torch.cuda.device_count() >= 2
        backend = "nccl" if two_gpus else "gloo"
        os.environ.setdefault("RLEF_BUS_ADDR", "127.0.0.1")  # both ends on this machine
        numel = (1 << 20) if self.device.type == "cuda" else (1 << 18)  # 4 MiB or 1 MiB
        gen = torch.Generator(device=self.device).manual_seed(0)
        tensors = [
            (f"w{i}", torch.randn(numel, device=self.device, generator=gen))
            for i in range(BUS_TENSORS)
        ]
        with tempfile.TemporaryDirectory(prefix="gpu_check_bus_") as tmp:
            run_dir = Path(tmp)
            sender = BusSender(
                run_dir, 1, BUS_BUCKET_MIB, 60.0, BUS_TIMEOUT_S, host_group(), backend=backend
            )
            log = open(run_dir / "receiver.log", "w")  # noqa: SIM115 - closed below
            receiver = subprocess.Popen(
                [sys.executable, __file__, "--bus-receiver", str(run_dir)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            try:
                first = sender.send(1, lambda: iter(tensors))
                received = run_dir / "received-1.json"
                deadline = time.monotonic() + 60
                while not received.exists() and time.monotonic() < deadline:
                    time.sleep(0.05)
                expect(first["bus_ok"] == 1, f"version 1: {first}")
                got = json.loads(received.read_text()) if received.exists() else {}
                expect(got == _digests(tensors), "version 1 arrived different")
                second = sender.send(2, lambda: iter(tensors))
                code = receiver.wait(timeout=60)
            finally:
                receiver.kill()
                receiver.wait()
                log.close()
                tail = (run_dir / "receiver.log").read_text()[-2000:]
            expect(code == -signal.SIGKILL, f"the receiver ended with {code}: {tail}")
            expect(second["bus_ok"] == 0, f"version 2 reported {second} with its receiver dead")
            expect(second["bus_seconds"] < BUS_TIMEOUT_S + 10, f"version 2 took {second}")
            # This process goes on: a collective of its own and kernels after the failed round.
            x = torch.ones(1, device=self.device)
            dist.all_reduce(x)
            expect(float((x * 2).sum()) == 2.0, "the process's own group after the failed round")
        numbers.update(
            backend=backend,
            gb=sum(t.numel() * t.element_size() for _, t in tensors) / GB,
            round_s=first["bus_seconds"],
            gb_per_s=first["bus_gbytes_per_s"],
            failed_round_s=second["bus_seconds"],
        )
        if self.device.type == "cuda" and not two_gpus:
            numbers["nccl"] = "one GPU: NCCL refuses two ranks on a device (bus_nccl_failure)"

    def bus_nccl_failure(self, numbers: dict[str, Any]) -> None:
        """The bus's NCCL failure handling (rollout/bus.py `_group`): two child processes
        (`--nccl-stall`) each with a world group of NCCL (torch's defaults, the trainer's
        situation) hold the GPU's stream (torch.cuda._sleep) so that a bus broadcast cannot
        complete in time. The bus's group must fail the round as an exception, start no
        watchdog, and leave its process running past every teardown torch has; the control,
        a group made as torch makes it by default (the bus before), shows what it averts."""
        outs, children = {}, {}
        with tempfile.TemporaryDirectory(prefix="gpu_check_stall_") as tmp:
            for kind in ("bus", "default"):
                outs[kind] = Path(tmp, f"{kind}.json")
                children[kind] = subprocess.Popen(
                    [sys.executable, __file__, "--nccl-stall", kind, "--out", str(outs[kind])],
                    env={**os.environ, **STALL_ENV},
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            results = {}
            for kind, child in children.items():
                try:
                    log, _ = child.communicate(timeout=120)
                except subprocess.TimeoutExpired:
                    child.kill()
                    log, _ = child.communicate()
                record = json.loads(outs[kind].read_text()) if outs[kind].exists() else {}
                results[kind] = (child.returncode, record, log[-2000:])
        code, bus, log = results["bus"]
        expect(code == 0 and bus.get("survived"), f"bus child ended with {code}: {bus} {log}")
        expect(bus["failure"] is not None, f"the stalled bus broadcast did not fail: {bus}")
        expect(bus["failed_after_s"] < STALL_TIMEOUT_S + 10, f"failed late: {bus}")
        expect(bus["watchdogs_added"] == 0, f"the bus's group started a watchdog: {bus}")
        control_code, control, _ = results["default"]
        numbers.update(
            failure=bus["failure"],
            failed_after_s=bus["failed_after_s"],
            survived_s=SURVIVE_S,
            bus_watchdogs=bus["watchdogs_added"],
            default_watchdogs=control.get("watchdogs_added", -1),
            default_exit=control_code,
            default_survived=bool(control.get("survived")),
        )

    def imports(self, numbers: dict[str, Any]) -> None:
        loaded = [m for m in NOT_ON_DEVICE if m in sys.modules]
        numbers["loaded"] = ",".join(loaded) or "none"
        expect(not loaded, f"the trainer path imported {loaded}, which the GPU machine lacks")


def _digests(tensors: Any) -> dict[str, str]:
    """Each tensor's bytes, hashed (equal exactly, whatever devices the two ends use)."""
    import hashlib

    import torch

    def raw(t: Any) -> bytes:
        return t.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes()

    return {name: hashlib.sha256(raw(t)).hexdigest() for name, t in tensors}


def bus_receiver(run_dir: Path) -> None:
    """The bus check's rollout worker: follows the sender's versions (bus_rounds) and writes
    version 1's digests to run_dir/received-1.json; in version 2 it kills itself after its
    second tensor, the rest of the round still to come. On the second GPU where there are
    two (NCCL), else on the CPU (gloo)."""
    # A receiver with no engine: the bus's engine-rank lookup must not import vLLM (seconds
    # here, absent on the GPU machine).
    sys.modules["vllm"] = None  # type: ignore[assignment]
    import torch

    from rlef_hpc.rollout.bus import BusReceiver, receive

    if torch.cuda.is_available():
        torch.cuda.set_device(torch.cuda.device_count() - 1)
    receiver = BusReceiver(run_dir, 0, 1, BUS_TIMEOUT_S)
    deadline, seen = time.monotonic() + 300, 0
    while seen < 2 and time.monotonic() < deadline:
        version = receiver.announced()
        if version is None or version <= seen:
            time.sleep(0.02)
            continue
        seen, round_ = version, receiver.join(version)
        if round_ is None:
            continue
        tensors = []
        for i, item in enumerate(receive(round_)):
            if version == 2 and i == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            tensors.append(item)
        (run_dir / f"received-{version}.json").write_text(json.dumps(_digests(tensors)))


def _threads(name: str) -> int:
    """This process's threads named `name` (Linux keeps 15 characters of a thread's name)."""
    return sum(t.read_text().strip() == name for t in Path("/proc/self/task").glob("*/comm"))


def nccl_stall(kind: str, out: Path) -> None:
    """One process of bus_nccl_failure: a world group of NCCL with torch's defaults, then a
    one-rank group made by the bus (`kind` "bus") or as torch makes one by default
    ("default"): a broadcast that completes, then one behind a stream the GPU sleeps on, waited
    on as the bus waits; the group aborted as the bus aborts it; then SURVIVE_S seconds and the
    world group's collective again. Writes what it saw to `out` (at the failure, and again if it
    lives on)."""
    import torch
    import torch.distributed as dist

    from rlef_hpc.rollout import bus

    torch.cuda.set_device(0)
    store = dist.HashStore()
    device = torch.device("cuda", 0)
    dist.init_process_group(
        "nccl", store=dist.PrefixStore("world/", store), rank=0, world_size=1, device_id=device
    )
    x = torch.ones(1, device=device)
    dist.all_reduce(x)
    torch.cuda.synchronize()
    watchdogs = _threads("pt_nccl_watchdg")
    bus_store = dist.PrefixStore("bus/", store)
    if kind == "bus":
        group = bus._group(bus_store, "v/1/0/", 0, 1, "nccl", STALL_TIMEOUT_S)
    else:
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timedelta(seconds=STALL_TIMEOUT_S)
        group = dist.ProcessGroupNCCL(dist.PrefixStore("v/1/0/", bus_store), 0, 1, options)
    flat = torch.zeros(1 << 20, dtype=torch.uint8, device=device)
    bus._wait(bus._broadcast(group, flat), STALL_TIMEOUT_S)
    record: dict[str, Any] = {"watchdogs_added": _threads("pt_nccl_watchdg") - watchdogs}
    torch.cuda._sleep(STALL_CYCLES)
    start = time.monotonic()
    try:
        bus._wait(bus._broadcast(group, flat), STALL_TIMEOUT_S)
        record["failure"] = None
    except Exception as e:  # noqa: BLE001 - the failure this check is after
        record["failure"] = f"{type(e).__name__}: {str(e)[:200]}"
    record["failed_after_s"] = time.monotonic() - start
    bus._abort(group)
    out.write_text(json.dumps(record))
    time.sleep(SURVIVE_S)
    dist.all_reduce(x)
    torch.cuda.synchronize()
    record["survived"] = float(x.item()) == 1.0
    out.write_text(json.dumps(record))
    dist.destroy_process_group()


def _version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "not installed"


def job_config(device: str, overrides: list[str]) -> Any:
    from rlef_hpc.config import load
    from rlef_hpc.launch.config import JobConfig

    shape = GPU_SHAPE if device == "cuda" else CPU_SHAPE
    return load(JobConfig, None, [*shape, *COMMON, *overrides])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    # The first step allocates the optimizer states and warms the kernels: tokens/s and MFU
    # are the median of the others.
    ap.add_argument("--steps", type=int, default=3, help="PPO steps (default 3)")
    out = Path(os.environ.get("OUT", "/tmp"), "gpu_check.json")
    ap.add_argument("--out", type=Path, default=out, help=f"the JSON report (default {out})")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides")
    # The child processes of the bus checks.
    ap.add_argument("--bus-receiver", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--nccl-stall", choices=["bus", "default"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.bus_receiver:
        bus_receiver(args.bus_receiver)
        return 0
    if args.nccl_stall:
        nccl_stall(args.nccl_stall, args.out)
        return 0
    if args.device == "cpu":
        # Before torch loads: on a GPU machine, --device cpu must still mean gloo and the CPU.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from rlef_hpc import runtime

    runtime.setup()
    import torch

    runtime.setup_megatron()

    if args.device == "cuda" and not torch.cuda.is_available():
        ap.exit(2, "gpu_check: no CUDA device (use --device cpu)\n")
    cfg = job_config(args.device, args.overrides)
    check = GpuCheck(cfg, args.steps)
    report = Report()
    report.run("setup", check.setup)
    report.run("matmul_rate", check.matmul, ("setup",))
    # First on a CPU, where peak memory is the process's and never goes down: after the PPO
    # models it would read 0; on a GPU the order does not matter.
    report.run("logprobs", check.logprobs, ("setup",))
    report.run("build", check.build, ("setup",))
    report.run("ppo_update", check.ppo, ("build",))
    report.run("throughput", check.throughput, ("ppo_update", "matmul_rate"))
    report.run("plan_memory", check.plan, ("ppo_update",))
    report.run("hf_stream", check.hf_stream, ("ppo_update",))
    check.release()
    report.run("warm_start", check.warm_start, ("setup",))
    report.run("bus_rounds", check.bus_rounds, ("setup",))
    if args.device == "cuda":
        report.run("bus_nccl_failure", check.bus_nccl_failure)
    report.run("imports", check.imports)

    header = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "megatron_core": _version("megatron-core"),
        "shape": [*GPU_SHAPE, *COMMON] if args.device == "cuda" else [*CPU_SHAPE, *COMMON],
        "overrides": args.overrides,
    }
    print(f"\n{header['device']}, torch {header['torch']}, megatron-core {header['megatron_core']}")
    print(report.table())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {**header, "ok": report.ok, "checks": {k: asdict(c) for k, c in report.checks.items()}}
    args.out.write_text(json.dumps(result, indent=2))
    print(f"{'ok' if report.ok else 'FAILED'}; written to {args.out}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
