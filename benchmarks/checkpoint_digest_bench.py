"""What a checkpoint's manifest costs (rlef_hpc.checkpoint.manifest): per byte a rank writes,
the write itself (the baseline), the SHA-256 that rank computes right after writing (in its
page cache: the save's cost), the size check (a stat per file: every resume) and the SHA-256 of
files read back from the disk (the resume's cost, each rank a share), and CRC-32 for scale.

    python benchmarks/checkpoint_digest_bench.py [--gb 1 --files 8 --dir /tmp]

The last column scales each cost to what one rank of the shipped 70B run carries: policy and
value (70B parameters each) at 14 bytes a parameter (bf16 weights, fp32 main weights and two
Adam moments), spread over its 1,024 ranks: ~1.9 GB. The 8B run (128 ranks) carries about as
much per rank.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

from rlef_hpc.checkpoint import manifest

PER_RANK_70B = 2 * 70e9 * 14 / 1024


def evict(paths: list[Path]) -> None:
    """Drops the files' pages from the page cache (they are clean after fsync): the next read
    comes from the disk, as at a resume on another node."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def crc32(path: Path) -> int:
    value = 0
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            value = zlib.crc32(chunk, value)
    return value


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=1.0)
    p.add_argument("--files", type=int, default=8)
    p.add_argument("--dir", default=None, help="where to write (default: the temp directory)")
    args = p.parse_args()
    each = int(args.gb * 1e9 / args.files)
    block = os.urandom(8 << 20)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        paths = [Path(tmp, f"__{i}_0.distcp") for i in range(args.files)]

        def write() -> None:
            for path in paths:
                with open(path, "wb") as f:
                    for _ in range(each // len(block)):
                        f.write(block)
                    f.flush()
                    os.fsync(f.fileno())  # as megatron's writer does

        rows = [("write + fsync (baseline)", timed(write))]
        rows.append(
            ("SHA-256 after writing (save)", timed(lambda: [manifest.digest(x) for x in paths]))
        )
        stat = timed(lambda: [x.stat().st_size for x in paths])
        evict(paths)
        rows.append(
            ("SHA-256 read from disk (resume)", timed(lambda: [manifest.digest(x) for x in paths]))
        )
        rows.append(("CRC-32 after reading", timed(lambda: [crc32(x) for x in paths])))
        total = each // len(block) * len(block) * len(paths)
    print(f"{total / 1e9:.2f} GB in {len(paths)} files, one process\n")
    print("| step | seconds | GB/s | s per 70B rank (1.9 GB) |")
    print("|---|---|---|---|")
    for name, seconds in rows:
        rate = total / seconds / 1e9
        print(f"| {name} | {seconds:.3f} | {rate:.2f} | {PER_RANK_70B / 1e9 / rate:.2f} |")
    print(f"| sizes: a stat a file (resume) | {stat / len(paths):.6f} a file | - | - |")


if __name__ == "__main__":
    main()
