"""rlef-train: the RLEF training loop.

    rlef-train                                    the CPU demo (configs/demo_cpu.yaml's values)
    rlef-train configs/llama3_8b.yaml ppo.kl_coef=0.02 run.dir=runs/8b
    torchrun --nproc-per-node 2 -m rlef_hpc.train.cli CONFIG parallel.data=2

A run directory that holds a checkpoint is resumed from its newest intact one. The terminal
shows progress, one line per iteration and the result; the libraries' logs and warnings go to
run.dir/logs/train.log (--verbose: shown live too). Exit status: 0 when done; 2 for a bad
config or input, a full disk at a save, or no intact checkpoint to resume from; 75 when stopped
by SIGTERM/SIGUSR1 after saving a checkpoint (run the same command again, or let Slurm requeue,
to continue).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Nothing here loads torch at import: runtime.setup() comes first (dist_env, logs and config
# load none).
from rlef_hpc import dist_env, logs, runtime
from rlef_hpc.config import describe, load_or_exit


def parser() -> argparse.ArgumentParser:
    from rlef_hpc.train.config import TrainConfig

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
    runtime.setup()
    from rlef_hpc.train.config import TrainConfig, check_machine

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
    dist_env.require_world_size(cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.world_size)
    # What only this machine can tell (FP8 against its GPU), likewise before anything is built.
    try:
        check_machine(cfg)
    except ValueError as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    if cfg.rollout.layout == "colocated":
        dist_env.require_engine_gpu_visible()
    for file in cfg.eval.transfer:  # read only after the warm start: say it before anything
        if not Path(file).is_file():
            p.exit(2, f"{p.prog}: error: eval.transfer: {file}: no such file\n")
    if cfg.data.source == "synthetic":  # drawn in a blink: too few is said before anything
        from rlef_hpc.train.problems import load_problems, load_test_problems

        try:
            load_problems(cfg)
            load_test_problems(cfg)
        except ValueError as e:
            p.exit(2, f"{p.prog}: error: {e}\n")
    logs.setup(Path(cfg.run.dir) / "logs", logs.process_name("train"), args.verbose)
    runtime.setup_megatron()
    from rlef_hpc.checkpoint.hf_dir import CheckpointError
    from rlef_hpc.train.loop import train

    try:
        train(cfg)
    except CheckpointError as e:  # a full disk, no intact checkpoint: every rank raises it
        first = logs.process_name("train") == "train"  # rank 0 says it, once
        p.exit(2, f"{p.prog}: error: {e}\n" if first else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
