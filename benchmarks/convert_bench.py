"""Export of a torch_dist model checkpoint to a Hugging Face directory: streamed (what
tools/convert_to_hf.py does) against the naive path (build the model, load all of it, convert
all of it, then save), side by side, each in a fresh process.

    python benchmarks/convert_bench.py [--hidden 2048 --layers 16 --dtype bfloat16]  (~1B)

Peak RSS is the exporting process's whole peak resident set (imports included).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

# Smaller than the tool's 2 GiB default so that, on a ~1B model, the bound (one layer plus one
# shard) is visibly below the model's size, as it is at 70B with the default.
SHARD_BYTES = 512 << 20


def make_checkpoint(ckpt: Path, hidden: int, layers: int, dtype: str) -> int:
    """A random Llama in torch_dist; returns its parameter count."""
    from megatron.core import dist_checkpointing

    from rlef_hpc.dist_env import init_process_groups
    from rlef_hpc.models.config import ModelConfig, PrecisionConfig
    from rlef_hpc.models.gpt import build_gpt
    from rlef_hpc.models.megatron_compat import seed

    heads = hidden // 64
    cfg = ModelConfig(
        vocab_size=32000,
        hidden_size=hidden,
        num_layers=layers,
        num_attention_heads=heads,
        num_query_groups=max(heads // 4, 1),
        ffn_hidden_size=int(hidden * 2.75),
        max_position_embeddings=2048,
    )
    init_process_groups()
    seed(0)
    model = build_gpt(cfg, PrecisionConfig(dtype))
    (ckpt / "policy").mkdir(parents=True)
    dist_checkpointing.save(model.sharded_state_dict(), str(ckpt / "policy"))
    (ckpt / "model_config.json").write_text(json.dumps({**asdict(cfg), "dtype": dtype}))
    return sum(p.numel() for p in model.parameters())


def naive_export(ckpt: Path, out: Path) -> None:
    from safetensors.torch import save_file

    from rlef_hpc.checkpoint.convert import load_model_checkpoint
    from rlef_hpc.checkpoint.hf import megatron_to_hf
    from rlef_hpc.dist_env import init_process_groups

    init_process_groups()
    model, cfg, _ = load_model_checkpoint(ckpt, "policy")
    state = {
        hf_name: part.contiguous().clone()
        for name, param in model.named_parameters()
        for hf_name, part in megatron_to_hf(name, param.detach(), cfg)
    }
    out.mkdir(parents=True)
    save_file(state, str(out / "model.safetensors"))


def worker(method: str, ckpt: Path, out: Path) -> dict:
    from rlef_hpc.checkpoint.convert import export_hf

    start = time.perf_counter()
    if method == "streamed":
        export_hf(ckpt, out, shard_bytes=SHARD_BYTES)
    else:
        naive_export(ckpt, out)
    elapsed = time.perf_counter() - start
    written = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": elapsed, "gb": written / 1e9, "peak_rss_mb": peak_mb}


def run_child(*args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", *args], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "make":
            result = {"params": make_checkpoint(Path(rest[0]), args.hidden, args.layers, rest[1])}
        else:
            result = worker(kind, Path(rest[0]), Path(rest[1]))
        print(json.dumps(result))
        return
    tmp = Path(tempfile.mkdtemp(prefix="convert-bench-"))
    try:
        ckpt = tmp / "ckpt"
        made = run_child(
            "make",
            str(ckpt),
            args.dtype,
            "--hidden",
            str(args.hidden),
            "--layers",
            str(args.layers),
        )
        rows = {m: run_child(m, str(ckpt), str(tmp / m)) for m in ("naive", "streamed")}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"random Llama, {made['params'] / 1e9:.2f}B parameters, {args.dtype}, "
        f"streamed shards of {SHARD_BYTES >> 20} MiB, this machine"
    )
    print()
    print("| export | seconds | GB written | GB/s | peak RSS MB | RSS vs naive |")
    print("|---|---|---|---|---|---|")
    base = rows["naive"]["peak_rss_mb"]
    for method, r in rows.items():
        print(
            f"| {method} | {r['seconds']:.2f} | {r['gb']:.2f} | {r['gb'] / r['seconds']:.2f} "
            f"| {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / base:.2f} |"
        )


if __name__ == "__main__":
    from rlef_hpc import runtime

    runtime.setup()
    runtime.setup_megatron()
    main()
