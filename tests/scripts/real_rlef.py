"""rlef-train as a user runs it (the arguments are its overrides), optionally with a broken
refit: STALE=1 in the environment leaves one tensor (layer 15's attention output projection)
out of every refit, so that the engine keeps its old values (test_real_model runs it).

    python tests/scripts/real_rlef.py KEY=VALUE ...
"""

from __future__ import annotations

import os
import sys


def main() -> int:
    if os.environ.get("STALE") == "1":
        from rlef_hpc.train import sources

        real = sources.engine_weights

        def stale(model, cfg):
            return ((n, t) for n, t in real(model, cfg) if "layers.15.self_attn.o_proj" not in n)

        sources.engine_weights = stale
    from rlef_hpc.train.cli import main as train

    return train(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
