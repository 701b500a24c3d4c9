"""Model checkpoint (torch_dist) -> Hugging Face Llama directory.

python tools/convert_to_hf.py CKPT_DIR OUT_DIR [--dtype bfloat16] [--value-model]
"""

import argparse
import sys

from rlef_hpc import runtime


def main() -> int:
    runtime.setup()
    runtime.setup_megatron()
    from rlef_hpc.checkpoint.convert import CheckpointError, export_hf

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpt_dir")
    p.add_argument("out_dir")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--tokenizer", help="directory to copy tokenizer files from (default: CKPT_DIR)")
    p.add_argument(
        "--value-model",
        action="store_true",
        help="export the value network (trunk + value_head.weight/bias)",
    )
    args = p.parse_args()
    try:
        out = export_hf(args.ckpt_dir, args.out_dir, args.dtype, args.value_model, args.tokenizer)
    except (CheckpointError, FileNotFoundError) as e:
        p.exit(2, f"convert_to_hf: error: {e}\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
