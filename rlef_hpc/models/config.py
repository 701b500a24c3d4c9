"""Model and parallel-layout configs: Llama-3.1 presets, the HF config.json of a supported family
(Llama 3.x, Qwen2/2.5, Qwen3), the checks of a shape against a layout (naming the field), and
of FP8 against the GPU."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

# The model families this stack trains: Hugging Face architecture -> family. Each is a Llama
# trunk (RMSNorm, SwiGLU, RoPE, GQA) with megatron-core's own options for what differs:
# Qwen2/2.5 add biases to q, k and v (add_qkv_bias); Qwen3 normalises each head's queries and
# keys (qk_layernorm) and sets head_dim apart from hidden / heads (kv_channels).
FAMILIES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
ARCHITECTURES = {family: arch for arch, family in FAMILIES.items()}


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int  # key/value heads (GQA)
    ffn_hidden_size: int
    max_position_embeddings: int = 8192
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    # Llama 3.1 RoPE scaling (megatron hard-codes low 1, high 4, original 8192: others rejected)
    rope_scaling: bool = False
    rope_scaling_factor: float = 8.0
    family: Literal["llama", "qwen2", "qwen3"] = "llama"
    qkv_bias: bool = False  # biases on q, k and v (Qwen2)
    qk_norm: bool = False  # RMSNorm of each head's queries and keys, before RoPE (Qwen3)
    kv_channels: int | None = None  # per-head width where it is not hidden / heads (Qwen3)

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, source: str | Path | dict[str, Any]) -> ModelConfig:
        """From a Hugging Face config (a dict, a config.json, or a model directory) of a
        supported family, named by `architectures` (else `model_type`); anything the family's
        architecture reads that megatron's model would not honour is refused by name."""
        if not isinstance(source, dict):
            path = Path(source)
            path = path / "config.json" if path.is_dir() else path
            source = json.loads(path.read_text())
        hf = source
        family = _family(hf)
        # transformers < 5: rope_theta and rope_scaling; >= 5: rope_parameters holding both.
        rope = hf.get("rope_parameters") or {}
        scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type") == "llama3" else {})
        if scaling and scaling.get("rope_type", scaling.get("type")) not in ("llama3", None):
            raise ValueError(f"rope_scaling: only llama3 scaling is supported, got {scaling}")
        theta = hf.get("rope_theta") or rope.get("rope_theta") or 10000.0
        if scaling:
            expected = {
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            }
            for key, value in expected.items():
                if scaling.get(key, value) != value:
                    raise ValueError(
                        f"rope_scaling.{key}: megatron supports only {value}, got {scaling[key]}"
                    )
        unsupported = {"hidden_act": "silu"}
        if family != "qwen2":  # Qwen2's q/k/v always carry biases, its o_proj none
            unsupported["attention_bias"] = False
        if family == "llama":
            unsupported["mlp_bias"] = False
        else:
            unsupported["use_sliding_window"] = False
        for key, value in unsupported.items():
            if hf.get(key, value) != value:
                raise ValueError(f"{key}={hf[key]} is not supported (only {value})")
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_query_groups=hf.get("num_key_value_heads") or heads,
            ffn_hidden_size=hf["intermediate_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 8192),
            rope_theta=float(theta),
            norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            rope_scaling=bool(scaling),
            rope_scaling_factor=float(scaling.get("factor", 8.0)),
            family=family,
            qkv_bias=family == "qwen2",
            qk_norm=family == "qwen3",
            kv_channels=head_dim if head_dim * heads != hf["hidden_size"] else None,
        )


def _family(hf: dict[str, Any]) -> str:
    """The family of an HF config: its `architectures` (what transformers and vLLM build from
    it), or its `model_type` where it names none."""
    architectures = hf.get("architectures") or []
    if architectures:
        if len(architectures) != 1 or architectures[0] not in FAMILIES:
            raise ValueError(
                f"architectures: {', '.join(architectures)} is not supported (supported: "
                f"{', '.join(FAMILIES)})"
            )
        return FAMILIES[architectures[0]]
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"model_type: {model_type!r} is not supported (supported: {', '.join(ARCHITECTURES)})"
        )
    return model_type


PRESETS = {
    "llama3_8b": ModelConfig(128256, 4096, 32, 32, 8, 14336, 131072, rope_scaling=True),
    "llama3_70b": ModelConfig(128256, 8192, 80, 64, 8, 28672, 131072, rope_scaling=True),
    # Small enough for 2 CPU cores; head_dim 32, which vLLM's CPU attention supports.
    "tiny": ModelConfig(512, 64, 4, 2, 1, 128, 2048, rope_theta=10000.0),
}


@dataclass(frozen=True)
class ParallelConfig:
    """Tensor, pipeline and data parallel sizes of the trainer."""

    tensor: int = 1
    pipeline: int = 1
    data: int = 1

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < 1:
                raise ValueError(
                    f"parallel.{f.name} must be at least 1, got {getattr(self, f.name)}"
                )

    @property
    def world_size(self) -> int:
        return self.tensor * self.pipeline * self.data


@dataclass(frozen=True)
class PrecisionConfig:
    """Parameter dtype, and FP8 through Transformer Engine on Hopper."""

    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # "bfloat16" on GPUs
    fp8: Literal["e4m3", "hybrid"] | None = None
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise"] = "delayed"
    # The first and last layers in bf16: megatron's default (off); delayed scaling refuses it.
    fp8_first_last_bf16: bool = False
    # Activation recomputation: None keeps every layer's activations for backward; "full"
    # keeps only each layer's input and recomputes the layer in backward (~1/3 more compute,
    # what makes 70B episodes of ~9k tokens fit at TP 8: see tools/plan.py).
    recompute: Literal["full"] | None = None

    def __post_init__(self) -> None:
        # megatron's TransformerConfig rule (0.16.1), here so that a config is refused when it
        # is loaded rather than when every rank builds its model (tests hold the two equal).
        if self.fp8 is not None and self.fp8_recipe == "delayed" and self.fp8_first_last_bf16:
            raise ValueError(
                "precision.fp8_first_last_bf16=true needs precision.fp8_recipe tensorwise or "
                "blockwise: megatron's delayed scaling does not support first/last layers in bf16"
            )


def validate_layout(model: ModelConfig, parallel: ParallelConfig) -> None:
    """The model's shape against the parallel layout: what would otherwise fail deep inside
    megatron, on every rank, at once. Config only: TrainConfig.validate() runs it on the shape
    the config knows before start; build_gpt() again on the shape it builds (a scratch model's
    trained vocabulary, a checkpoint's shape)."""
    for axis, field in [("tensor", "num_attention_heads"), ("tensor", "num_query_groups"),
                        ("tensor", "ffn_hidden_size"), ("tensor", "vocab_size"),
                        ("pipeline", "num_layers")]:  # fmt: skip
        divisor, value = getattr(parallel, axis), getattr(model, field)
        if value % divisor:
            raise ValueError(f"parallel.{axis}={divisor} must divide model.{field}={value}")
    if model.num_attention_heads % model.num_query_groups:
        raise ValueError("model.num_query_groups must divide model.num_attention_heads")
    if model.kv_channels is None and model.hidden_size % model.num_attention_heads:
        raise ValueError("model.num_attention_heads must divide model.hidden_size")


def require_fp8_gpu(setting: str, compute_capability: tuple[int, int] | None) -> None:
    """FP8 GEMMs (Transformer Engine's, vLLM's) need Ada or Hopper (compute capability 8.9+);
    `setting` names what asked for them (None: no CUDA)."""
    if compute_capability is None:
        raise ValueError(f"{setting} needs a GPU with compute capability >= 8.9; none found")
    if compute_capability < (8, 9):
        raise ValueError(
            f"{setting} needs compute capability >= 8.9, this GPU has {compute_capability}"
        )


def validate_hardware(
    precision: PrecisionConfig,
    compute_capability: tuple[int, int] | None,
    transformer_engine: bool,
) -> None:
    """FP8 against the GPU (None: no CUDA) and Transformer Engine: only the machine that
    builds the model can tell."""
    if precision.fp8 is None:
        return
    require_fp8_gpu("precision.fp8", compute_capability)
    if precision.fp8_recipe == "blockwise" and compute_capability[0] != 9:
        raise ValueError(
            f"precision.fp8_recipe=blockwise needs Hopper (9.x), this GPU has {compute_capability}"
        )
    if not transformer_engine:
        # megatron's own layers would build and silently train in bf16
        raise ValueError("precision.fp8 needs Transformer Engine, which is not installed")


def validate(
    model: ModelConfig,
    parallel: ParallelConfig,
    precision: PrecisionConfig,
    compute_capability: tuple[int, int] | None = None,
    transformer_engine: bool = False,
) -> None:
    """validate_layout() and validate_hardware() on a given machine."""
    validate_layout(model, parallel)
    validate_hardware(precision, compute_capability, transformer_engine)


def compute_capability() -> tuple[int, int] | None:
    """This machine's GPU compute capability, or None without CUDA."""
    import torch

    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


def check(
    model: ModelConfig,
    parallel: ParallelConfig,
    precision: PrecisionConfig,
    transformer_engine: bool,
) -> None:
    """validate() against this machine's hardware (and whether it has Transformer Engine):
    call it before building the model."""
    validate(model, parallel, precision, compute_capability(), transformer_engine)
