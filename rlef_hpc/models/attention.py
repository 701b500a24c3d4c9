"""Core attention on PyTorch's `scaled_dot_product_attention`, for where Transformer Engine is
absent (the CPU, GPUs without TE): the local spec's `core_attention` (see `gpt.layer_spec`).

Megatron's own `DotProductAttention` materialises the [b, heads, T, T] scores, their softmax
and both again in backward; SDPA's fused kernels (flash on CPU and CUDA, memory-efficient on
CUDA) work in tiles and never hold T x T, and skip the masked half of a causal product.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPAttention(DotProductAttention):
    """Megatron's `DotProductAttention` with its scores, masked softmax and context replaced by
    one `F.scaled_dot_product_attention` call: the same constructor, attributes (heads and
    query groups per tensor-parallel partition, softmax scale) and (empty) checkpoint state,
    so the spec can put either in a layer and the weights do not notice.

    Inputs are megatron's: query [sq, b, heads, hn], key and value [sk, b, groups, hn] (this
    partition's); the output is [sq, b, heads * hn].

    The mask: under `AttnMaskType.causal` (the GPT specs' self-attention) the product is causal
    and the mask tensor is not read, as in megatron's fused softmax and in Transformer Engine
    (megatron: "a user-defined mask is only needed when attn_mask_type is not causal"). The
    trainer's mask is `gpt.causal_mask` and its sequences are right-padded, so causal alone is
    also what the mask says for every real token. Under other mask types a given mask is
    applied (megatron's convention, True = masked out, turned into SDPA's True = attend).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        config = self.config
        # What megatron's unfused path supports beyond these would need its RNG tracker
        # (dropout), extra logits (softmax offsets) or a band mask (windows): refused, not
        # silently computed otherwise. The trainer's config sets none of them.
        if self.attention_dropout.p != 0.0:
            raise ValueError(
                f"SDPAttention supports attention_dropout=0 only, got {self.attention_dropout.p}"
            )
        if config.softmax_type != "vanilla":
            raise ValueError(
                f"SDPAttention supports softmax_type='vanilla' only, got {config.softmax_type}"
            )
        if self.scale_mask_softmax.window_size is not None:
            raise ValueError("SDPAttention does not support sliding-window attention")
        # DotProductAttention divides its scale by the layer number under
        # apply_query_key_layer_scaling and its softmax multiplies the scores back (for fp16
        # range): the product is the plain scale, which SDPA takes once.
        coeff = self.scale_mask_softmax.scale
        self.sdpa_scale = self.softmax_scale * (coeff if coeff is not None else 1.0)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: Any = None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention: no packed sequences, no attention bias")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        sq, b, heads, hn = query.shape
        causal = mask_type == AttnMaskType.causal
        if causal and sq != key.shape[0]:
            # SDPA aligns a causal mask top-left, megatron's only allows self-attention.
            raise ValueError(f"causal attention needs sq == sk, got {sq} and {key.shape[0]}")
        mask = None
        if not causal and attention_mask is not None:
            mask = attention_mask.logical_not()
        # [s, b, n, hn] -> [b, n, s, hn]: views; SDPA takes strided inputs.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        context = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=0.0,
            is_causal=causal,
            scale=self.sdpa_scale,
            # Query heads share key/value groups as megatron's repeat_interleave does (query
            # head i reads group i // (heads / groups)), without copying the groups out.
            enable_gqa=k.shape[1] != heads,
        )
        # [b, n, sq, hn] -> [sq, b, n * hn]
        return context.permute(2, 0, 1, 3).reshape(sq, b, heads * hn)
