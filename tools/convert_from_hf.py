"""Hugging Face Llama directory -> torch_dist model checkpoint (policy, and value model).

python tools/convert_from_hf.py HF_DIR OUT_DIR [--no-value-model]
"""

import argparse
import sys

from rlef_hpc import runtime


def main() -> int:
    runtime.setup()
    runtime.setup_megatron()
    from rlef_hpc.checkpoint.convert import CheckpointError, import_hf

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("hf_dir")
    p.add_argument("out_dir")
    p.add_argument("--no-value-model", action="store_true", help="convert the policy only")
    args = p.parse_args()
    try:
        cfg = import_hf(args.hf_dir, args.out_dir, value_model=not args.no_value_model)
    except (CheckpointError, FileNotFoundError) as e:
        p.exit(2, f"convert_from_hf: error: {e}\n")
    print(f"wrote {args.out_dir}: {cfg.num_layers} layers, hidden {cfg.hidden_size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
