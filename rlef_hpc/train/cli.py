"""rlef-train: the RLEF training loop.

    rlef-train                                    the CPU demo (configs/demo_cpu.yaml's values)
    rlef-train configs/llama3_8b.yaml ppo.kl_coef=0.02 run.dir=runs/8b
    torchrun --nproc-per-node 2 -m rlef_hpc.train.cli CONFIG parallel.data=2

A run directory that holds a checkpoint is resumed from its latest. The terminal shows progress,
one line per iteration and the result; the libraries' logs and warnings go to
run.dir/logs/train.log (--verbose: shown live too). Exit status: 0 when
done; 2 for a bad config or input; 75 when stopped by SIGTERM/SIGUSR1 after saving a
checkpoint (run the same command again, or let Slurm requeue, to continue).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# logs before anything loads torch: it quiets C++ warnings (dist_env does not load torch)
from rlef_hpc import dist_env, logs
from rlef_hpc.config import describe, load_or_exit
from rlef_hpc.train.config import TrainConfig


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rlef-train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(
            [__doc__.split("\n\n", 1)[1].strip(), "", "config keys (group.key: type = default):"]
            + describe(TrainConfig)
        ),
    )
    p.add_argument("config", nargs="?", help="YAML config file (default: the CPU demo)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show the libraries' logs live (always in run.dir/logs/)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    overrides = list(args.overrides)
    path = args.config
    if path is not None and "=" in path:  # only overrides, no file
        overrides.insert(0, path)
        path = None
    cfg = load_or_exit(p, TrainConfig, path, overrides)
    # The launch's refusals first (GPUs asked for but unusable, a TP group across nodes):
    # a process that must not start writes nothing, not even its log directory.
    dist_env.require_gpus_where_asked()
    dist_env.require_tensor_groups_within_nodes(cfg.parallel.tensor)
    if cfg.rollout.layout == "colocated":
        dist_env.require_engine_gpu_visible()
    for file in cfg.eval.transfer:  # read only after the warm start: say it before anything
        if not Path(file).is_file():
            p.exit(2, f"{p.prog}: error: eval.transfer: {file}: no such file\n")
    if cfg.data.source == "synthetic":  # drawn in a blink: too few is said before anything
        from rlef_hpc.train.problems import load_test_problems

        try:
            load_test_problems(cfg)
        except ValueError as e:
            p.exit(2, f"{p.prog}: error: {e}\n")
    logs.setup(Path(cfg.run.dir) / "logs", logs.process_name("train"), args.verbose)
    from rlef_hpc.train.loop import train

    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
