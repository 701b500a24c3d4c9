"""The trainer's memory on the real model (SmolLM2-135M-Instruct, tools/fetch_real_model.py)
on CPU, fp32, against tools/plan.py's terms for the same config: the resident states (policy,
value, reference, optimizers: after a first update allocated them) and the peak one PPO update
adds (activations and logits), measured as the kernel counts resident memory (VmHWM).

    python benchmarks/real_model_memory.py [--episodes 8] [--tokens 1536] [--breakdown]

--breakdown profiles the second update (torch.profiler's CPU allocation events: every tensor
torch allocates and frees, not glibc's pages) and reports, per phase (the reference, pi_old
and V_old forwards, the policy's and the value model's forward/backward, each optimizer step),
the peak of live tensor bytes above the update's start, and which tensors are live at the
update's peak, grouped by the op that made them and their size: how many [positions x vocab]
logits-sized tensors the peak holds, against tools/plan.py's terms.

No engine here: the 14.6 GB of issue 28's run was the trainer and its colocated vLLM engine
in one process (vLLM's CPU KV cache, its weights, its runtime) besides the trainer.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "tests" / "scripts"))
from alloc_profile import Phases, Timeline  # noqa: E402
from peak_rss import PeakRSS  # noqa: E402

GB = 1024**3


def batch(episodes: int, length: int, vocab: int):
    """Episodes of `length` tokens, 3 turns each, answers of 256 tokens (issue 28's run)."""
    from rlef_hpc.rl.ppo import PPOBatch

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (episodes, length), generator=g)
    response = torch.zeros(episodes, length, dtype=torch.bool)
    turn_of = torch.full((episodes, length), -1)
    value_index = torch.zeros(episodes, 3, dtype=torch.long)
    step = length // 3
    for turn in range(3):
        start = turn * step + step - 256
        response[:, start : start + 256] = True
        turn_of[:, start : start + 256] = turn
        value_index[:, turn] = start - 1
    turn_mask = torch.ones(episodes, 3, dtype=torch.bool)
    reward = torch.rand(episodes, 3, generator=g) * 2 - 1
    behaviour = -torch.rand(episodes, length, generator=g) * response
    return PPOBatch(tokens, response, turn_of, value_index, turn_mask, reward, behaviour)


def breakdown(prof, vocab: int) -> None:
    timeline = Timeline(prof)
    print("\n| phase | peak live tensor GB above the update's start | at its start |")
    print("|---|---|---|")
    for name, (peak, before) in timeline.peaks().items():
        print(f"| {name} | {peak / GB:.2f} | {before / GB:.2f} |")
    phase, live = timeline.live_at_peak()
    print(f"\nat the peak ({timeline.peak() / GB:.2f} GB, in {phase}): live tensors by maker")
    groups: dict[str, list[int]] = {}
    for size, maker in live:
        groups.setdefault(maker, []).append(size)
    print("| op [backward of] | tensors | GB | largest MB | largest / (vocab x 4 B) |")
    print("|---|---|---|---|---|")
    for maker, sizes in sorted(groups.items(), key=lambda g: -sum(g[1]))[:20]:
        print(
            f"| {maker} | {len(sizes)} | {sum(sizes) / GB:.3f} | {max(sizes) / 2**20:.1f} | "
            f"{max(sizes) / (vocab * 4):.1f} positions |"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--episodes", type=int, default=8)
    p.add_argument("--tokens", type=int, default=1536)
    p.add_argument("--breakdown", action="store_true", help="profile the second update")
    args = p.parse_args()
    from rlef_hpc.checkpoint.gguf import real_model_dir
    from rlef_hpc.checkpoint.hf_dir import build_from_hf, read_model_config
    from rlef_hpc.config import load
    from rlef_hpc.dist_env import init_process_groups
    from rlef_hpc.launch.config import JobConfig
    from rlef_hpc.launch.plan import plan
    from rlef_hpc.models.config import PrecisionConfig
    from rlef_hpc.models.megatron_compat import seed
    from rlef_hpc.rl.update import PPOUpdate

    hf = real_model_dir()
    init_process_groups()
    seed(0)
    cfg = read_model_config(hf)
    process = psutil.Process()
    libc = ctypes.CDLL("libc.so.6")

    def live() -> int:
        """Resident bytes after glibc returned what it holds freed (malloc_trim): what is
        live, not the high-water mark of an earlier step."""
        libc.malloc_trim(0)
        return process.memory_info().rss

    # the plan of the same config first: a config error fails before the model loads
    job = load(
        JobConfig,
        None,
        [
            "model.init=hf",
            f"model.hf_dir={hf}",
            "rollout.max_tokens=256",
            f"rollout.rollouts_per_iteration={args.episodes}",
            "rollout.samples_per_problem=1",
            "update.num_minibatches=1",
            "update.micro_batch_tokens=4096",
        ],
    )
    planned = plan(job).trainer
    base = live()
    policy, reference, value = build_from_hf(
        hf, cfg, PrecisionConfig("float32"), ("policy", "policy", "value")
    )
    weights = live() - base
    update = PPOUpdate(policy, value, reference, micro_batch_tokens=4096)
    buffers = live() - base - weights  # megatron's DDP buffers (grads), the optimizers
    data = batch(args.episodes, args.tokens, cfg.vocab_size)
    with PeakRSS() as first:
        update.step(data, num_minibatches=1)
    states = live() - base  # Adam's moments exist from the first step on
    if args.breakdown:
        from torch.profiler import ProfilerActivity, profile

        Phases(update)
        with (
            PeakRSS() as second,
            profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
        ):
            update.step(data, num_minibatches=1)
    else:
        with PeakRSS() as second:
            update.step(data, num_minibatches=1)
    # the three models' states (the colocated plan's other terms are the engine's and the GPU's)
    resident = sum(v for k, v in planned.items() if "policy" in k or "value model" in k)
    weights_planned = planned["reference policy (frozen)"] * 3
    print(f"SmolLM2-135M-Instruct, fp32, {args.episodes} episodes x {args.tokens} tokens")
    print("| trainer term | measured GB | tools/plan.py GB |\n|---|---|---|")
    print(f"| weights of the 3 models | {weights / GB:.2f} | {weights_planned / GB:.2f} |")
    print(f"| + DDP grad buffers, optimizers (before a step) | {buffers / GB:.2f} | |")
    print(f"| states after the first step (live) | {states / GB:.2f} | {resident / GB:.2f} |")
    for name, peak in (("first", first), ("second", second)):
        print(
            f"| {name} update's peak above its start | {peak.bytes / GB:.2f} | "
            f"{planned['activations'] / GB:.2f} |"
        )
    if args.breakdown:
        breakdown(prof, cfg.vocab_size)


if __name__ == "__main__":
    from rlef_hpc import runtime

    runtime.setup()
    runtime.setup_megatron()
    main()
