"""Builds the model as on a machine with apex and without Transformer Engine (issue 32.5):
megatron's transformer_block then takes apex's FusedLayerNorm as the block's final norm,
which asserts LayerNorm. Its import is simulated (apex is not installed here): the module-level
choice is set as megatron sets it when apex imports. Prints the final norm's type (run by
test_gpu_path).

    python tests/scripts/apex_final_norm.py
"""

from __future__ import annotations

import os

import torch.distributed as dist


def main() -> None:
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    dist.init_process_group("gloo")
    from megatron.core import parallel_state as ps
    from megatron.core.fusions.fused_layer_norm import FusedLayerNorm
    from megatron.core.transformer import transformer_block

    from rlef_hpc.models.config import PRESETS, PrecisionConfig
    from rlef_hpc.models.gpt import build_gpt
    from rlef_hpc.models.megatron_compat import seed

    transformer_block.LayerNormImpl = FusedLayerNorm  # "elif HAVE_APEX: ..." at its import
    ps.initialize_model_parallel(1, 1)
    seed(0)
    for value in (False, True):
        model = build_gpt(PRESETS["tiny"], PrecisionConfig(), value=value)
        print("FINAL", type(model.decoder.final_layernorm).__name__, flush=True)


if __name__ == "__main__":
    main()
