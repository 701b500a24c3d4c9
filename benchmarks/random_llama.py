"""The benchmarks' random Llama (refit_bench, transport_bench): hidden 2048 x 16 layers is
0.85B parameters, with Llama 3.1's proportions (MLP 2.75x, four query heads per KV head,
untied embeddings), a 32k vocabulary and a small byte-level tokenizer."""

from __future__ import annotations

from typing import Any

import torch


def random_llama(hidden: int, layers: int) -> tuple[Any, Any]:
    """(LlamaForCausalLM in eval mode, seeded 0; its tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlef_hpc.models.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(["def f(x):\n    return x + 1\n"] * 20, vocab_size=512)
    heads = hidden // 64
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(heads // 4, 1),
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), tokenizer
