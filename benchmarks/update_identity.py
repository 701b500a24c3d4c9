"""Whether a change to the PPO update moved any number: a few `PPOUpdate.step`s on fixed batches
under each layout, on this checkout and on another commit, compared bit for bit (the updated
parameters of the policy and the value model on every rank, and every metric of every step).

    python benchmarks/update_identity.py --base cf0390d [--layouts tp1 tp2 pp2 dp2] [--steps 3]

The other commit is exported (git archive) to a temporary directory and run from there, the
same script (this file) driving both. Run it alone: each layout is a torchrun of 1 or 2
processes per commit (about 15 s each on 2 cores). Exit status 0 when identical, 1 with the
first differences listed otherwise.

Worker (what torchrun runs; the script's own code runs against whichever rlef_hpc is first on
PYTHONPATH):
    torchrun --nproc-per-node N benchmarks/update_identity.py --worker --tp T --pp P --out DIR
"""

from __future__ import annotations

import argparse
import inspect
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# name: (tensor, pipeline, processes)
LAYOUTS = {"tp1": (1, 1, 1), "tp2": (2, 1, 2), "pp2": (1, 2, 2), "dp2": (1, 1, 2)}
BATCH, SEQ, VOCAB = 16, 48, 128
MICRO_BATCH_TOKENS = 64  # several micro-batches a minibatch, of different lengths


def batch(step: int):
    """Step `step`'s batch: rows of one to three turns, random lengths, tokens past the end."""
    import torch

    from rlef_hpc.rl.ppo import PPOBatch

    g = torch.Generator().manual_seed(100 + step)
    k = 3
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    response = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    turn_of = torch.full((BATCH, SEQ), -1)
    value_index = torch.zeros(BATCH, k, dtype=torch.long)
    turn_mask = torch.zeros(BATCH, k, dtype=torch.bool)
    for row in range(BATCH):
        start = 2
        for j in range(int(torch.randint(1, k + 1, (), generator=g))):
            prompt = int(torch.randint(1, 5, (), generator=g))
            answer = int(torch.randint(1, 9, (), generator=g))
            if start + prompt + answer > SEQ:
                break
            s = start + prompt
            response[row, s : s + answer] = True
            turn_of[row, s : s + answer] = j
            value_index[row, j] = s - 1
            turn_mask[row, j] = True
            start = s + answer
    reward = (torch.rand(BATCH, k, generator=g) * 2 - 1) * turn_mask
    behaviour = -torch.rand(BATCH, SEQ, generator=g) * 5 * response
    return PPOBatch(tokens, response, turn_of, value_index, turn_mask, reward, behaviour)


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    try:  # the explicit runtime set-up, where the checkout has one (older ones made it implicitly)
        from rlef_hpc import runtime
    except ImportError:
        runtime = None
    if runtime is not None:
        runtime.setup()
        runtime.setup_megatron()
    from megatron.core import parallel_state as ps

    from rlef_hpc.models.config import ModelConfig, PrecisionConfig
    from rlef_hpc.models.gpt import build_gpt
    from rlef_hpc.models.megatron_compat import seed
    from rlef_hpc.rl.optim import OptimConfig
    from rlef_hpc.rl.ppo import PPOConfig
    from rlef_hpc.rl.update import PPOUpdate

    dist.init_process_group("gloo")
    ps.initialize_model_parallel(args.tp, args.pp)
    seed(1234)
    model = ModelConfig(VOCAB, 64, 4, 4, 2, 128, 64, rope_theta=10000.0)
    policy = build_gpt(model, PrecisionConfig())
    value = build_gpt(model, PrecisionConfig(), value=True)
    reference = build_gpt(model, PrecisionConfig())
    kwargs = {"micro_batch_tokens": MICRO_BATCH_TOKENS, "temperature": 0.9}
    if "batching" in inspect.signature(PPOUpdate).parameters:  # before the padded path left
        kwargs["batching"] = "bucketed"
    update = PPOUpdate(
        policy,
        value,
        reference,
        PPOConfig(),
        OptimConfig(lr=1e-3, warmup_steps=2, grad_clip=1.0),
        **kwargs,
    )
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    metrics = []
    for step in range(args.steps):
        mine = batch(step).select(torch.arange(dp_rank, BATCH, dp))
        metrics.append(update.step(mine, num_minibatches=2))
    state = {
        "policy": {k: v for k, v in policy.state_dict().items() if torch.is_tensor(v)},
        "value": {k: v for k, v in value.state_dict().items() if torch.is_tensor(v)},
        "metrics": metrics,
    }
    torch.save(state, Path(args.out) / f"rank{dist.get_rank()}.pt")
    dist.barrier()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(root: Path, layout: str, steps: int, out: Path) -> None:
    tp, pp, nproc = LAYOUTS[layout]
    out.mkdir(parents=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    cmd += ["--master-addr", "127.0.0.1", "--master-port", str(free_port()), __file__]
    cmd += ["--worker", "--tp", str(tp), "--pp", str(pp), "--steps", str(steps)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    proc = subprocess.run(
        [*cmd, "--out", str(out)], env=env, cwd=root, capture_output=True, text=True
    )
    if proc.returncode:
        raise SystemExit(f"{layout} at {root}: failed\n{proc.stderr[-4000:]}")


def differences(base: Path, mine: Path) -> list[str]:
    import torch

    found = []
    for file in sorted(base.glob("rank*.pt")):
        a, b = torch.load(file), torch.load(mine / file.name)
        for model in ("policy", "value"):
            if a[model].keys() != b[model].keys():
                found.append(f"{file.name} {model}: other parameters")
                continue
            found += [
                f"{file.name} {model}.{name}: max |diff| "
                f"{(t.double() - b[model][name].double()).abs().max().item():.3g}"
                for name, t in a[model].items()
                if not torch.equal(t, b[model][name])
            ]
        for step, (x, y) in enumerate(zip(a["metrics"], b["metrics"], strict=True)):
            found += [
                f"{file.name} step {step} {k}: {x.get(k)!r} != {y.get(k)!r}"
                for k in sorted(set(x) | set(y))
                if x.get(k) != y.get(k)
            ]
    return found


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", help="the commit to compare this checkout with")
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--worker", action="store_true")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--out")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0
    if not args.base:
        p.error("--base COMMIT is needed")
    with tempfile.TemporaryDirectory(prefix="update-identity-") as tmp:
        base_root = Path(tmp, "base")
        base_root.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", args.base], capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(base_root)], input=archive, check=True)
        failed = False
        for layout in args.layouts:
            run(base_root, layout, args.steps, Path(tmp, "out-base", layout))
            run(ROOT, layout, args.steps, Path(tmp, "out-mine", layout))
            found = differences(Path(tmp, "out-base", layout), Path(tmp, "out-mine", layout))
            files = len(list(Path(tmp, "out-base", layout).glob("rank*.pt")))
            verdict = "identical" if not found else f"{len(found)} differences"
            print(f"{layout}: {args.steps} steps, {files} rank(s): {verdict}", flush=True)
            for line in found[:10]:
                print(f"  {line}")
            failed |= bool(found)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
