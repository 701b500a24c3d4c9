"""Hugging Face <-> megatron GPTModel parameter names and layouts, per model family (Llama,
Qwen2, Qwen3: rlef_hpc.models.config.FAMILIES), for full (unsharded, TP=1, global layer
numbers) tensors. The one place that knows them: import, export, each rank's slices, the
refit, the published files and the weight bus all use it.

- Every family has the Llama layer (the renames below); Qwen2 adds q/k/v biases, fused into
  megatron's linear_qkv.bias like the weights' rows; Qwen3 adds the per-head query and key
  norms (self_attn.q_norm / k_norm <-> self_attention.q_layernorm / k_layernorm).

- Two layer specs name the layer norms differently: megatron's local spec has its own
  `input_layernorm` / `pre_mlp_layernorm` modules, Transformer Engine's fuses them into the
  next linear (`self_attention.linear_qkv.layer_norm_weight`, `mlp.linear_fc1.layer_norm_
  weight`). Full states are named as the local spec names them; `local_name` maps TE names.

- q/k/v_proj <-> linear_qkv: megatron interleaves per query group,
  [q_g0 (heads per group), k_g0, v_g0, q_g1, ...], each head `head_dim` rows.
- gate_proj, up_proj <-> linear_fc1 = [gate; up].
- RoPE: megatron's default rotate-half equals HF's, so Q and K rows need no permutation.
- The value model exports its trunk under the usual names and its head (megatron's
  output_layer.weight / .bias there) as `value_head.weight` [1, hidden] and `value_head.bias` [1].
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator

import torch

from rlef_hpc.models.config import ModelConfig

# megatron suffix -> HF suffix, per layer (the fused ones are handled apart)
_LAYER_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
_QK_NORMS = {
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
}
_QKV = "self_attention.linear_qkv."
_FC1 = "mlp.linear_fc1.weight"


def _renames(cfg: ModelConfig) -> dict[str, str]:
    """The family's one-to-one layer renames (megatron suffix -> HF suffix)."""
    return {**_LAYER_RENAMES, **(_QK_NORMS if cfg.qk_norm else {})}


def _qkv_parts(cfg: ModelConfig) -> tuple[str, ...]:
    """Which of linear_qkv's tensors the family has: its weight, and Qwen2's bias."""
    return ("weight", "bias") if cfg.qkv_bias else ("weight",)


def layer_suffixes(cfg: ModelConfig) -> tuple[str, ...]:
    """The parameter names (local spec) of one decoder layer of the family."""
    return (*_renames(cfg), *(_QKV + part for part in _qkv_parts(cfg)), _FC1)


_GLOBAL_RENAMES = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}
_VALUE_HEAD = {"output_layer.weight": "value_head.weight", "output_layer.bias": "value_head.bias"}
_MEGATRON_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


@functools.cache
def _fused_norms() -> tuple[tuple[str, str], ...]:
    """(TE spec's prefix, local spec's prefix) of each layer norm TE fuses into a linear,
    e.g. ("self_attention.linear_qkv.layer_norm_", "input_layernorm."): from megatron's own
    map, the one its local spec uses to checkpoint under TE's names (so no TE needed)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    keys = get_gpt_layer_local_spec(normalization="RMSNorm").submodules.sharded_state_dict_keys_map
    return tuple((te, local) for local, te in keys.items())


def _local_suffix(suffix: str) -> str:
    """A parameter name within a layer, as the local spec names it."""
    for te, local in _fused_norms():
        if suffix.startswith(te):
            return local + suffix.removeprefix(te)
    return suffix


def local_name(name: str) -> str:
    """A megatron parameter name as the local spec names it, whichever spec built the model."""
    m = _MEGATRON_LAYER.match(name)
    return f"decoder.layers.{m[1]}.{_local_suffix(m[2])}" if m else name


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Megatron's QKV weight (or bias: rows alone) of the query groups q, k and v hold: all
    of them, or a tensor-parallel rank's (a contiguous block of groups)."""
    d, rest = cfg.head_dim, q.shape[1:]
    groups, per_group = k.shape[0] // d, cfg.num_attention_heads // cfg.num_query_groups
    q = q.reshape(groups, per_group * d, *rest)
    k = k.reshape(groups, d, *rest)
    v = v.reshape(groups, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(
    qkv: torch.Tensor, cfg: ModelConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups, d, rest = cfg.num_query_groups, cfg.head_dim, qkv.shape[1:]
    per_group = cfg.num_attention_heads // groups
    view = qkv.reshape(groups, (per_group + 2) * d, *rest)
    q = view[:, : per_group * d].reshape(-1, *rest)
    k = view[:, per_group * d : (per_group + 1) * d].reshape(-1, *rest)
    v = view[:, (per_group + 1) * d :].reshape(-1, *rest)
    return q, k, v


# torch_dist checkpoint keys -> parameter names of the local spec at TP=1. Layers are stacked
# along a first axis under "decoder.layers.<suffix>"; the layer norms are stored under the names
# Transformer Engine's fused modules give them, whichever spec saved them.
_CHECKPOINT_GLOBAL = (
    "embedding.word_embeddings.weight",
    "decoder.final_layernorm.weight",
    "output_layer.weight",
    "output_layer.bias",
)
_CHECKPOINT_LAYER = (
    *_LAYER_RENAMES,
    *_QK_NORMS,
    _QKV + "weight",
    _QKV + "bias",
    _FC1,
)


def checkpoint_key_to_name(key: str, layer: int) -> str | None:
    """The megatron parameter name (local spec) of a torch_dist key at `layer`; None for what
    is not a model weight (optimizer state, TE extra state)."""
    if key in _CHECKPOINT_GLOBAL:
        return key
    if not key.startswith("decoder.layers."):
        return None
    suffix = _local_suffix(key.removeprefix("decoder.layers."))
    return f"decoder.layers.{layer}.{suffix}" if suffix in _CHECKPOINT_LAYER else None


def megatron_to_hf(
    name: str, tensor: torch.Tensor, cfg: ModelConfig, value: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """One full megatron tensor (named by either spec) -> its HF tensor(s); `value`: of the
    value model."""
    name = local_name(name)
    if value and name in _VALUE_HEAD:
        yield _VALUE_HEAD[name], tensor
        return
    if name in _GLOBAL_RENAMES:
        yield _GLOBAL_RENAMES[name], tensor
        return
    m = _MEGATRON_LAYER.match(name)
    if m is None:
        raise KeyError(f"no Hugging Face name for megatron parameter {name!r}")
    prefix, suffix = f"model.layers.{m[1]}.", m[2]
    renames = _renames(cfg)
    if suffix.startswith(_QKV) and suffix.removeprefix(_QKV) in _qkv_parts(cfg):
        part = suffix.removeprefix(_QKV)
        for proj, t in zip(("q", "k", "v"), split_qkv(tensor, cfg), strict=True):
            yield f"{prefix}self_attn.{proj}_proj.{part}", t
    elif suffix == _FC1:
        gate, up = tensor.chunk(2, dim=0)
        yield f"{prefix}mlp.gate_proj.weight", gate
        yield f"{prefix}mlp.up_proj.weight", up
    elif suffix in renames:
        yield prefix + renames[suffix], tensor
    else:
        raise KeyError(f"no Hugging Face name for megatron parameter {name!r} ({cfg.family})")


# (HF tensor name, dim to take this rank's chunk along or None for all of it) -> that block
ReadHF = Callable[[str, int | None], torch.Tensor]


def megatron_from_hf(name: str, cfg: ModelConfig, read: ReadHF, dim: int | None) -> torch.Tensor:
    """The megatron parameter `name` (global layer number, either spec's name) built from the
    HF tensors it comes from, each read through `read` along `dim` (the parameter's
    tensor-parallel partition dim, None where it is replicated). Every rule is one of chunks:
    a rank's QKV block is its query groups' q, k and v rows fused, its linear_fc1 block is
    [its gate rows; its up rows], so a reader that returns one chunk of each HF tensor gives
    this rank's shard without the whole tensor ever being read."""
    name = local_name(name)
    if name == "output_layer.weight" and cfg.tie_embeddings:  # the last stage's copy, PP > 1
        return read("model.embed_tokens.weight", dim)
    if name in _GLOBAL_RENAMES:
        return read(_GLOBAL_RENAMES[name], dim)
    m = _MEGATRON_LAYER.match(name)
    if m is None:
        raise KeyError(f"no Hugging Face tensor for megatron parameter {name!r}")
    prefix, suffix = f"model.layers.{m[1]}.", m[2]
    renames = _renames(cfg)
    if suffix.startswith(_QKV) and suffix.removeprefix(_QKV) in _qkv_parts(cfg):
        part = suffix.removeprefix(_QKV)
        return fuse_qkv(*(read(f"{prefix}self_attn.{p}_proj.{part}", dim) for p in "qkv"), cfg)
    if suffix == _FC1:
        gate, up = (read(f"{prefix}mlp.{p}_proj.weight", dim) for p in ("gate", "up"))
        return torch.cat([gate, up], dim=0)
    if suffix in renames:
        return read(prefix + renames[suffix], dim)
    raise KeyError(f"no Hugging Face tensor for megatron parameter {name!r} ({cfg.family})")


def megatron_names(cfg: ModelConfig) -> list[str]:
    """The full model's parameter names (local spec, global layers) an HF model of the family
    provides."""
    names = [n for n in _GLOBAL_RENAMES if not (n == "output_layer.weight" and cfg.tie_embeddings)]
    return names + [
        f"decoder.layers.{i}.{suffix}"
        for i in range(cfg.num_layers)
        for suffix in layer_suffixes(cfg)
    ]


def hf_to_megatron(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A whole HF state dict -> full megatron tensors, named as the local spec names
    them (load_full_state maps them onto either spec's model); missing names are errors."""

    def take(name: str, dim: int | None) -> torch.Tensor:
        if name not in hf:
            raise KeyError(f"the Hugging Face checkpoint has no {name!r}")
        return hf[name]

    return {name: megatron_from_hf(name, cfg, take, None) for name in megatron_names(cfg)}
