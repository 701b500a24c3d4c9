"""Which the trainer builds first in the colocated layout: the engine or its models (the
models' builder stops the run there); prints ORDER and the order (test_rollout_engine runs it).

    python tests/scripts/colocated_order.py RUN_DIR OVERRIDE...
"""

from __future__ import annotations

import sys
from typing import Any


class Stop(Exception):
    pass


def main() -> None:
    from rlef_hpc.config import load
    from rlef_hpc.train import loop
    from rlef_hpc.train.config import TrainConfig

    built: list[str] = []

    def engine(*args: Any) -> None:
        built.append("engine")

    def models(*args: Any) -> None:
        built.append("models")
        raise Stop

    loop.own_engine = engine
    loop.build_from_hf = models
    cfg = load(TrainConfig, None, [f"run.dir={sys.argv[1]}", *sys.argv[2:]])
    try:
        loop.Trainer(cfg)
    except Stop:
        pass
    print("ORDER", *built, flush=True)


if __name__ == "__main__":
    from rlef_hpc import runtime

    runtime.setup()
    runtime.setup_megatron()
    main()
