"""Llama-architecture megatron-core GPTModels: the policy, and the value model (the same trunk
with a fresh scalar head in place of the output layer)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from rlef_hpc.models.config import ModelConfig, PrecisionConfig


def transformer_config(model: ModelConfig, precision: PrecisionConfig, tp: int, pp: int) -> Any:
    from megatron.core.transformer.transformer_config import TransformerConfig

    cuda = torch.cuda.is_available()
    dtype = getattr(torch, precision.dtype)
    extra: dict[str, Any] = {}
    if precision.recompute == "full":
        extra.update(
            recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
        )
    if precision.fp8 is not None:
        extra.update(
            fp8=precision.fp8,
            fp8_recipe=precision.fp8_recipe,
            first_last_layers_bf16=precision.fp8_first_last_bf16,
        )
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        ffn_hidden_size=model.ffn_hidden_size,
        kv_channels=model.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        pipeline_dtype=dtype,
        use_cpu_initialization=not cuda,
        perform_initialization=True,
        init_method_std=0.02,
        gradient_accumulation_fusion=False,  # needs apex for non-TE linears
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        **extra,
    )


def causal_mask(length: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Megatron's attention mask for one causal sequence: True where attention is masked."""
    return torch.triu(torch.ones(1, 1, length, length, dtype=torch.bool, device=device), 1)


def layer_spec() -> Any:
    """Transformer Engine's spec where TE and CUDA exist, megatron's local one elsewhere."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if torch.cuda.is_available():
        try:
            import transformer_engine  # noqa: F401

            return specs.get_gpt_layer_with_transformer_engine_spec()
        except ImportError:
            pass
    return specs.get_gpt_layer_local_spec()


class ValueHead(torch.nn.Module):
    """Hidden state -> scalar, in the output layer's place. Every tensor-parallel rank holds
    the whole (tiny) head and sees the same hidden states, so their gradients agree."""

    def __init__(self, hidden_size: int, dtype: torch.dtype) -> None:
        super().__init__()
        # Named like the output layer's (output_layer.weight / .bias), which megatron's
        # checkpointing expects; zero, so that V = 0 at the start and advantages start unbiased.
        self.weight = torch.nn.Parameter(torch.zeros(1, hidden_size, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(1, dtype=dtype))

    def forward(self, hidden: torch.Tensor, weight: Any = None, runtime_gather_output: Any = None):
        return F.linear(hidden, self.weight, self.bias), None


def build_gpt(model: ModelConfig, precision: PrecisionConfig, value: bool = False) -> Any:
    """The model chunk of this pipeline stage (parallel_state must be initialised)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    from rlef_hpc.models import megatron_compat

    megatron_compat.install()
    from rlef_hpc.models.config import ParallelConfig, check

    check(
        model,
        ParallelConfig(
            ps.get_tensor_model_parallel_world_size(),
            ps.get_pipeline_model_parallel_world_size(),
            ps.get_data_parallel_world_size(),
        ),
        precision,
    )
    config = transformer_config(
        model,
        precision,
        ps.get_tensor_model_parallel_world_size(),
        ps.get_pipeline_model_parallel_world_size(),
    )
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(),
        vocab_size=model.vocab_size,
        max_sequence_length=model.max_position_embeddings,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=model.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(model.rope_theta),
        rope_scaling=model.rope_scaling,
        rope_scaling_factor=model.rope_scaling_factor,
    )
    if value and ps.is_pipeline_last_stage():
        gpt.output_layer = ValueHead(model.hidden_size, config.params_dtype)
    return gpt
