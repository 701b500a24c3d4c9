"""Llama-architecture megatron-core GPTModels: the policy, and the value model (the same trunk
with a fresh scalar head in place of the output layer)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from rlef_hpc.models.config import ModelConfig, PrecisionConfig


@dataclass(frozen=True)
class Kernels:
    """What this machine offers megatron beyond plain torch; each fusion is on exactly where its
    kernel exists (a parameter of the builders below, so that tests can pose any machine).

    - cuda: the jit-fused bias-dropout-add.
    - te (Transformer Engine, on CUDA): its layers (norms fused into the linears, FP8), fused
      RoPE, and sequence parallelism (its norms handle sequence-sharded activations).
    - apex (apex's CUDA extensions): fused weight-gradient accumulation in megatron's own
      linears (the output layer is one even with TE: megatron raises without the extension)
      and the fused masked softmax of megatron's own attention (set in the config, though the
      local spec's self-attention is SDPA's, which needs no softmax kernel: see layer_spec).
    """

    cuda: bool = False
    te: bool = False
    apex: bool = False


def available_kernels() -> Kernels:
    """This machine's Kernels."""
    import importlib.util

    cuda = torch.cuda.is_available()

    def present(module: str) -> bool:
        return cuda and importlib.util.find_spec(module) is not None

    return Kernels(
        cuda=cuda,
        te=present("transformer_engine"),
        apex=present("fused_weight_gradient_mlp_cuda") and present("scaled_masked_softmax_cuda"),
    )


def transformer_config(
    model: ModelConfig,
    precision: PrecisionConfig,
    tp: int,
    pp: int,
    kernels: Kernels | None = None,
) -> Any:
    from megatron.core.transformer.transformer_config import TransformerConfig

    kernels = available_kernels() if kernels is None else kernels
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
    config = TransformerConfig(
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
        use_cpu_initialization=not kernels.cuda,
        perform_initialization=True,
        init_method_std=0.02,
        sequence_parallel=kernels.te and tp > 1,
        gradient_accumulation_fusion=kernels.apex,
        bias_dropout_fusion=kernels.cuda,
        apply_rope_fusion=kernels.te,
        masked_softmax_fusion=kernels.apex,
        persist_layer_norm=False,  # apex's persistent LayerNorm: not an RMSNorm
        **extra,
    )
    # The PPO update's micro-batches differ in length and rows (rl/batching.py): between
    # pipeline stages each activation's shape is sent ahead of it (3 integers a transfer). Set
    # after construction: the config's check refuses it for the MoE "allgather" token
    # dispatcher, its default, which this dense model never runs.
    config.variable_seq_lengths = pp > 1
    return config


def sequence_multiple(config: Any) -> int:
    """What a batch's sequence length s must be a multiple of for a model of this megatron
    config (batches right-pad to it): the tensor-parallel size tp under sequence parallelism
    (each rank takes s/tp positions), and under FP8 what Transformer Engine 2.11 requires of
    the token rows of every FP8 GEMM (tests/test_gpu_path.py holds these conditions as data):
    - 16 tokens: an FP8 operand's leading dimension must be a multiple of 16
      (common/gemm/cublaslt_gemm.cu, CanonicalizeGemmInput), and in the weight-gradient GEMM
      that dimension is the token count (s x rows, gathered under sequence parallelism);
    - 8 rows of what the rank holds: every FP8 linear asserts it of its input
      (pytorch/utils.py assert_dim_for_fp8_exec, from module/linear.py, layernorm_linear.py
      and layernorm_mlp.py), and under sequence parallelism a column-parallel layer's input is
      the rank's s/tp positions: s a multiple of 8 tp;
    - blockwise, with sequence parallelism: the slice a column-parallel layer all-gathers must
      quantize in blocks of 128 rows (utils.py assert_dim_for_all_gather ->
      tensor/float8_blockwise_tensor.py Float8BlockQuantizer.is_quantizable, block_len 128):
      s a multiple of 128 tp.
    Rows are s times the micro-batch's rows: asked of s, each holds for any number of rows."""
    sp = bool(config.sequence_parallel)
    tp = config.tensor_model_parallel_size if sp else 1
    if not config.fp8:
        return tp
    rows = 128 if sp and config.fp8_recipe == "blockwise" else 8
    return math.lcm(16, rows * tp)


def causal_mask(length: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Megatron's attention mask for one causal sequence: True where attention is masked."""
    return torch.triu(torch.ones(1, 1, length, length, dtype=torch.bool, device=device), 1)


def layer_spec(kernels: Kernels | None = None) -> Any:
    """Transformer Engine's spec where TE and CUDA exist (its fused attention included),
    megatron's local one elsewhere with SDPA as its core attention: the one place that decides
    which attention implementation the model runs."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    kernels = available_kernels() if kernels is None else kernels
    if kernels.te:
        return specs.get_gpt_layer_with_transformer_engine_spec()
    from rlef_hpc.models.attention import SDPAttention

    # RMSNorm named: without it the local spec takes apex's FusedLayerNorm where apex is
    # installed, which rejects RMSNorm (without apex both are torch's norm: the same numbers).
    spec = specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    # megatron's local DotProductAttention materialises the T x T scores and probabilities
    # (and apex's fused softmax, where it would help, needs fp16/bf16 and T <= 4096); SDPA's
    # kernels do neither and give the same numbers (tests/test_attention.py).
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec


class ValueHead(torch.nn.Module):
    """Hidden state -> scalar, in the output layer's place. Every tensor-parallel rank holds
    the whole (tiny) head and sees the same hidden states, so their gradients agree."""

    def __init__(self, hidden_size: int, dtype: torch.dtype, sequence_parallel: bool) -> None:
        super().__init__()
        self.sequence_parallel = sequence_parallel
        # Named like the output layer's (output_layer.weight / .bias), which megatron's
        # checkpointing expects; zero, so that V = 0 at the start and advantages start unbiased.
        self.weight = torch.nn.Parameter(torch.zeros(1, hidden_size, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(1, dtype=dtype))

    def forward(self, hidden: torch.Tensor, weight: Any = None, runtime_gather_output: Any = None):
        if self.sequence_parallel:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            # Sequence parallelism hands each rank a slice of the sequence; the head wants it
            # whole. Every rank then computes the same values, so backward takes this rank's
            # slice of the gradient (a reduce-scatter would add up tp identical copies).
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        return F.linear(hidden, self.weight, self.bias), None


def build_gpt(model: ModelConfig, precision: PrecisionConfig, value: bool = False) -> Any:
    """The model chunk of this pipeline stage (parallel_state must be initialised)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    from rlef_hpc.models import megatron_compat

    megatron_compat.install()
    from rlef_hpc.models.config import ParallelConfig, check

    kernels = available_kernels()
    check(
        model,
        ParallelConfig(
            ps.get_tensor_model_parallel_world_size(),
            ps.get_pipeline_model_parallel_world_size(),
            ps.get_data_parallel_world_size(),
        ),
        precision,
        kernels.te,
    )
    config = transformer_config(
        model,
        precision,
        ps.get_tensor_model_parallel_world_size(),
        ps.get_pipeline_model_parallel_world_size(),
        kernels,
    )
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(kernels),
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
        gpt.output_layer = ValueHead(
            model.hidden_size, config.params_dtype, config.sequence_parallel
        )
    return gpt
