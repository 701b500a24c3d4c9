"""Peak memory and time of token log-probs: chunked (rlef_hpc.rl.logprobs) against the naive
fp32 log_softmax path, side by side, each in a fresh process.

    python benchmarks/logprob_bench.py [--tokens 4096] [--vocab 128256] [--dtype bfloat16]

Peak memory is the process's peak resident set above what it held once the logits (and
targets) existed: what computing the log-probs itself costs.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def worker(method: str, tokens: int, vocab: int, dtype: str, backward: bool, chunk: int) -> dict:
    import torch

    from rlef_hpc.rl.logprobs import naive_token_logprobs, token_logprobs

    torch.manual_seed(0)
    logits = torch.randn(tokens, vocab, dtype=getattr(torch, dtype), requires_grad=backward)
    targets = torch.randint(0, vocab, (tokens,))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if method == "chunked":
        logp, entropy = token_logprobs(logits, targets, chunk=chunk)
    else:
        logp, entropy = naive_token_logprobs(logits, targets)
    if backward:
        logp.sum().backward()
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"extra_mb": (peak - base) / 1024, "seconds": elapsed, "checksum": float(logp.sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "BACKWARD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        method, backward = args.worker[0], args.worker[1] == "1"
        print(json.dumps(worker(method, args.tokens, args.vocab, args.dtype, backward, args.chunk)))
        return
    print(f"{args.tokens} tokens x {args.vocab} vocab, {args.dtype} logits, chunk {args.chunk}\n")
    print("| pass | method | extra peak memory MB | seconds | memory vs naive |")
    print("|---|---|---|---|---|")
    for backward in (False, True):
        rows = {}
        for method in ("naive", "chunked"):
            shape = [
                "--tokens",
                str(args.tokens),
                "--vocab",
                str(args.vocab),
                "--dtype",
                args.dtype,
            ]
            run = ["--chunk", str(args.chunk), "--worker", method, str(int(backward))]
            cmd = [sys.executable, __file__, *shape, *run]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows[method] = json.loads(out.strip().splitlines()[-1])
        assert abs(rows["naive"]["checksum"] - rows["chunked"]["checksum"]) < 1e-2 * args.tokens
        for method, r in rows.items():
            ratio = r["extra_mb"] / rows["naive"]["extra_mb"]
            name = "forward+backward" if backward else "forward"
            print(f"| {name} | {method} | {r['extra_mb']:.0f} | {r['seconds']:.2f} | {ratio:.2f} |")


if __name__ == "__main__":
    from rlef_hpc import runtime

    runtime.setup()
    main()
