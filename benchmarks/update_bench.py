"""One PPO update (`PPOUpdate.step`) on realistic RLEF batches: the update as it is ("bucketed":
rows sorted by length, cut by update.micro_batch_tokens, each micro-batch padded to its own
longest row, logits only where a response token is predicted) against the baseline kept here
("padded": --padded-rows rows at a time in their given order, every one padded to the batch's
longest, every position's logits: the update before rl.batching), in the same run.

    python benchmarks/update_bench.py [--config configs/demo_cpu.yaml] [--rounds 2]
        [--batches demo long-tail] [--padded-rows 8] [--set KEY=VALUE ...] [--out PATH]

Batches, of random tokens in recorded shapes: "demo", the four batches of a real demo run
(benchmarks/demo_trajectory_shapes.json: 64 trajectories each, of 1 or 3 turns, 90 to 521
tokens), one step on each; "long-tail", the config's rollouts_per_iteration trajectories drawn
(seeded) from them, the first replaced by a three-turn 4096-token one. The model is the
config's (the demo's tiny Llama by default), random init, the same in every arm.

Each (batch, batching) arm runs in a fresh process, after one warm-up step on a few short
rows; arms alternate `--rounds` times and keep their fastest round (a shared machine's load
comes and goes). Reported: the steps' wall seconds and process CPU seconds (steadier under
contention), tokens/s (trajectory tokens per wall second), the share of processed positions
no loss reads (padding, and tokens past a row's last response or value index), the process's
peak memory growth over the steps (on a CPU the peak resident set, on a GPU the allocator's),
and the model's matmul FLOP/s (its linear layers and output layer over the real tokens: what
padding does not count) as a fraction of what `torch.matmul` reaches on the same shapes in
the same process: on this CPU the hardware bound, on a GPU the MFU against its measured
matmul rate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from gpu_check import Clock, PeakMemory, forward_flops, from_shapes

HERE = Path(__file__).parent
SHAPES = HERE / "demo_trajectory_shapes.json"
ROOT = HERE.parent
LONG_TAIL_TOKENS = 4096
BATCHES = ("demo", "long-tail")
BATCHINGS = ("padded", "bucketed")


def batch_shapes(name: str, count: int, seed: int) -> list[list[list[tuple[int, int]]]]:
    """The batches' turn shapes: "demo", every recorded iteration's batch as it was; "long-tail",
    `count` trajectories drawn from them all, the first replaced by three turns of 4096
    tokens in all (a quarter of each prompt or feedback, the rest answer)."""
    recorded = json.loads(SHAPES.read_text())["iterations"]
    if name == "demo":
        return recorded
    shapes = random.Random(seed).sample([t for it in recorded for t in it], count)
    turn = LONG_TAIL_TOKENS // 3
    prompt = turn // 4
    last = LONG_TAIL_TOKENS - 2 * turn
    shapes[0] = [[prompt, turn - prompt], [prompt, turn - prompt], [prompt, last - prompt]]
    return [shapes]


def model_shape(cfg: Any) -> Any:
    # Room for the long-tail trajectory, whatever the config's position limit.
    mc = cfg.model.known_shape()
    return dataclasses.replace(
        mc, max_position_embeddings=max(mc.max_position_embeddings, LONG_TAIL_TOKENS)
    )


def matmul_flops(mc: Any, tokens: int) -> float:
    """FLOPs of the model's matmuls in one step over `tokens` real tokens: forward-only passes
    of the policy, the reference and the value model, then forward and backward (three
    forwards) of the policy and the value model. Linear layers and the output layer only
    (gpu_check.forward_flops at seq=0): attention is SDPA's, not a matmul of these shapes."""
    policy, value = forward_flops(mc, tokens, 0, False), forward_flops(mc, tokens, 0, True)
    return 2 * policy + value + 3 * (policy + value)


def matmul_bound(mc: Any, device: Any, dtype: Any, tokens: int = 4096, reps: int = 5) -> float:
    """FLOP/s of `torch.matmul` on the model's GEMM shapes, random data, on this machine: per
    linear layer (and the output layer) of [tokens, in] x [in, out], the forward product and
    the two of its backward (the input's gradient, the weight's), as a training pass has."""
    import torch

    h, kv = mc.hidden_size, mc.num_query_groups * mc.head_dim
    layers = [(h, h + 2 * kv), (h, h), (h, 2 * mc.ffn_hidden_size), (mc.ffn_hidden_size, h)]
    layers.append((h, mc.vocab_size))
    clock = Clock(device)
    flops = seconds = 0.0
    for k, n in layers:
        for a, b in (((tokens, k), (k, n)), ((tokens, n), (n, k)), ((k, tokens), (tokens, n))):
            x = torch.randn(*a, device=device, dtype=dtype)
            y = torch.randn(*b, device=device, dtype=dtype)
            torch.matmul(x, y)  # warm-up
            times = [clock.time(lambda x=x, y=y: torch.matmul(x, y)) for _ in range(reps)]
            seconds += statistics.median(times)
            flops += 2 * tokens * k * n
    return flops / seconds


def load_config(path: str, overrides: list[str]) -> Any:
    from rlef_hpc.config import load
    from rlef_hpc.train.config import TrainConfig

    return load(TrainConfig, path, overrides)


# --- one arm, in a process of its own ----------------------------------------------------------


def padded_update(base: type, rows: int) -> type:
    """The baseline arm: `base` (PPOUpdate) planning fixed micro-batches of `rows` rows in
    their given order, every one at the batch's length (build it with select_logits=False:
    every position's logits)."""
    from rlef_hpc.rl.batching import KINDS, MicroBatch

    class PaddedUpdate(base):
        def plan(self, batch: Any, num_minibatches: int = 1) -> Any:
            plan = super().plan(batch, num_minibatches)  # its lengths and response positions
            b, t = batch.tokens.shape
            size = b // num_minibatches

            def fixed(first: int, count: int) -> list[Any]:
                end = first + count
                return [
                    MicroBatch(tuple(range(i, min(i + rows, end))), t)
                    for i in range(first, end, rows)
                ]

            return dataclasses.replace(
                plan,
                prepare={k: fixed(0, b) for k in KINDS},
                minibatches={
                    k: [fixed(m * size, size) for m in range(num_minibatches)] for k in KINDS
                },
            )

    return PaddedUpdate


def worker(cfg: Any, name: str, batching: str, repeats: int, rows: int) -> dict[str, Any]:
    import time

    import torch

    from rlef_hpc.dist_env import device, init_process_groups
    from rlef_hpc.models.gpt import build_gpt, sequence_multiple
    from rlef_hpc.models.megatron_compat import seed
    from rlef_hpc.rl.ppo import collate
    from rlef_hpc.rl.update import PPOUpdate

    init_process_groups(1, 1, 1)
    seed(cfg.run.seed)
    dev = device()
    mc = model_shape(cfg)
    policy = build_gpt(mc, cfg.precision)
    value = build_gpt(mc, cfg.precision, value=True)
    reference = build_gpt(mc, cfg.precision)
    reference.load_state_dict(policy.state_dict())
    u = cfg.update
    padded = batching == "padded"
    update = (padded_update(PPOUpdate, rows) if padded else PPOUpdate)(
        policy,
        value,
        reference,
        cfg.ppo,
        cfg.optim,
        temperature=cfg.rollout.temperature,
        micro_batch_tokens=u.micro_batch_tokens,
        select_logits=not padded,
    )
    multiple = sequence_multiple(policy.config)
    rng = random.Random(cfg.run.seed)
    # Warm-up: megatron's first-call work and the optimizer states, on short rows.
    warm = from_shapes([[(8, 8)]] * (u.num_minibatches * rows), mc.vocab_size, rng)
    memory = PeakMemory(dev)
    memory.start(relative=True)
    update.step(collate(warm, device=dev, multiple=multiple), u.num_minibatches)
    bound = matmul_bound(mc, dev, policy.config.params_dtype)
    batches = [
        from_shapes(shapes, mc.vocab_size, rng)
        for shapes in batch_shapes(name, cfg.rollout.rollouts_per_iteration, cfg.run.seed)
    ]
    seconds = cpu_seconds = 0.0
    metrics = []
    for trajs in batches:
        batch = collate(trajs, device=dev, multiple=multiple)
        times = []
        for _ in range(repeats):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            start, cpu = time.perf_counter(), time.process_time()
            out = update.step(batch, u.num_minibatches)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start, time.process_time() - cpu))
        seconds += min(t[0] for t in times)
        cpu_seconds += min(t[1] for t in times)
        metrics.append(out)
    # The bound in the same process and under the same load as the steps, before and after
    # them (a shared machine's best).
    bound = max(bound, matmul_bound(mc, dev, policy.config.params_dtype))
    trajs = [t for b in batches for t in b]
    tokens = sum(len(t.tokens) for t in trajs)
    # The whole run's padding share: each step's weighted by the positions it ran (tokens
    # over the non-padding share).
    processed = sum(
        sum(len(t.tokens) for t in b) / (1 - m["padding_fraction"])
        for b, m in zip(batches, metrics, strict=True)
    )
    return {
        "batch": name,
        "batching": batching,
        "steps": len(batches),
        "rows": len(trajs),
        "tokens": tokens,
        "longest": max(len(t.tokens) for t in trajs),
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "padding_fraction": 1 - tokens / processed,
        "peak_bytes": memory.peak(),
        "memory_source": memory.source,
        "matmul_flops": matmul_flops(mc, tokens),
        "matmul_bound": bound,
        "policy_loss": [m["policy_loss"] for m in metrics],
        "value_loss": [m["value_loss"] for m in metrics],
    }


# --- the run ---------------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_arm(args: argparse.Namespace, name: str, batching: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{HERE}", "MASTER_PORT": str(free_port())}
    cmd = [sys.executable, __file__, "--worker", name, batching, "--config", args.config]
    cmd += ["--repeats", str(args.repeats), "--padded-rows", str(args.padded_rows)]
    cmd += [f"--set={o}" for o in args.overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} {batching} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(arms: list[dict[str, Any]], cuda: bool) -> str:
    frac = "MFU" if cuda else "of matmul bound"
    lines = [
        f"| batch | batching | update s | CPU s | tokens/s | padded share | peak MB | {frac} "
        "| speed-up (wall / CPU) | last policy loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {a["batch"]: a for a in arms if a["batching"] == "padded"}
    for a in arms:
        achieved = a["matmul_flops"] / a["seconds"]
        ref = base[a["batch"]]
        lines.append(
            f"| {a['batch']} ({a['steps']} x {a['rows'] // a['steps']} rows, {a['tokens']} "
            f"tokens, longest {a['longest']}) | {a['batching']} | {a['seconds']:.2f} "
            f"| {a['cpu_seconds']:.2f} | {a['tokens'] / a['seconds']:.0f} "
            f"| {100 * a['padding_fraction']:.1f}% | {a['peak_bytes'] / 2**20:.0f} "
            f"| {100 * achieved / a['matmul_bound']:.1f}% "
            f"| {ref['seconds'] / a['seconds']:.2f}x "
            f"/ {ref['cpu_seconds'] / a['cpu_seconds']:.2f}x "
            f"| {a['policy_loss'][-1]:.6f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo_cpu.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides")
    ap.add_argument("--repeats", type=int, default=1, help="timed steps per batch (the fastest)")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each arm, alternating")
    ap.add_argument("--batches", nargs="+", choices=BATCHES, default=list(BATCHES))
    ap.add_argument(
        "--padded-rows", type=int, default=8, help="rows per micro-batch of the padded baseline"
    )
    ap.add_argument("--out", type=Path, help="also write the results as JSON")
    ap.add_argument("--worker", nargs=2, metavar=("BATCH", "BATCHING"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.worker:
        print(json.dumps(worker(cfg, *args.worker, args.repeats, args.padded_rows)))
        return
    import torch

    from rlef_hpc.dist_env import device

    # Arms alternate, `--rounds` times, and each keeps its fastest round: a shared machine's
    # load comes and goes.
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for _ in range(args.rounds):
        for name in args.batches:
            for b in BATCHINGS:
                runs.setdefault((name, b), []).append(run_arm(args, name, b))
    arms = [min(r, key=lambda a: a["seconds"]) for r in runs.values()]
    bounds = ", ".join(f"{a['matmul_bound'] / 1e9:.1f}" for a in arms)
    print(
        f"{device().type}, {torch.get_num_threads()} threads; torch.matmul on the model's "
        f"shapes, per arm: {bounds} GFLOP/s; memory: {arms[0]['memory_source']}"
    )
    print(table(arms, device().type == "cuda"))
    if args.out:
        args.out.write_text(json.dumps(arms, indent=2))


if __name__ == "__main__":
    from rlef_hpc import runtime

    runtime.setup()
    runtime.setup_megatron()
    main()
