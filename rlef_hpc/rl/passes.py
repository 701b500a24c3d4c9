"""A model's passes over a step's micro-batches (rl.batching's Parts) through megatron's
pipeline schedules: forward-only, or forward and backward into megatron DDP's gradient buffers,
under any tensor x pipeline layout. Each micro-batch is a forward of its tokens with positions
and the causal mask (views of tensors made once per longest length), its output handed to a
loss function that sees the Part it came from.

The policy's logits are needed only where they predict a response token: `forward` takes
those positions as an argument and feeds the output layer only their hidden states, so it
computes [n, vocab] logits rather than [rows x length, vocab]. megatron's GPTModel has no
argument for that: for the call, and only the call, a forward pre-hook on the output layer
(megatron-core 0.16.1: GPTModel._postprocess calls `output_layer(hidden_states, weight=...,
runtime_gather_output=...)`, hidden states [s, b, h]) picks those rows.

Under pipeline parallelism micro-batches differ in shape, which the p2p exchange learns from
the config's `variable_seq_lengths` (models/gpt.transformer_config). Everything is made on the
device given, the model's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch

from rlef_hpc.models.gpt import causal_mask
from rlef_hpc.rl.batching import Part

# loss(part, model output) -> (the loss to back-propagate, metrics to report); forward-only
# passes return a zero loss and report what they computed.
LossFn = Callable[[Part, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def output_layer(model: torch.nn.Module) -> torch.nn.Module | None:
    """The output layer of a GPTModel, or of the one megatron's DDP wraps; None on the stages
    before the last (they have none)."""
    from megatron.core.distributed import DistributedDataParallel

    inner = model.module if isinstance(model, DistributedDataParallel) else model
    return getattr(inner, "output_layer", None)


def forward(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    mask: torch.Tensor,
    logit_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """The model's output on `tokens` [b, s]. With `logit_index` (into the hidden states
    [s, b] flattened), the last stage's output layer gets only those hidden states ([n, 1, h])
    and the model returns their logits, [1, n, vocab shard]; without, every position's."""
    head = output_layer(model) if logit_index is not None else None
    if head is None:
        return model(tokens, positions, mask)

    def select(module: Any, args: tuple, kwargs: dict) -> Any:
        hidden = args[0].flatten(0, 1)[logit_index].unsqueeze(1)
        return (hidden, *args[1:]), kwargs

    handle = head.register_forward_pre_hook(select, with_kwargs=True)
    try:
        return model(tokens, positions, mask)
    finally:
        handle.remove()


class Passes:
    """Runs models over Parts on `device`, keeping the causal mask and the positions of the
    longest length seen (every micro-batch takes views of them)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._causal = causal_mask(0, device)
        self._arange = torch.arange(0, device=device)

    def mask(self, length: int) -> torch.Tensor:
        """Megatron's causal mask for `length` positions: a view of the longest made so far
        (the top-left corner of a causal mask is the shorter causal mask). Under the causal
        mask type neither SDPA nor TE reads it; megatron's own attention would."""
        if self._causal.shape[-1] < length:
            self._causal = causal_mask(length, self.device)
        return self._causal[..., :length, :length]

    def positions(self, rows: int, length: int) -> torch.Tensor:
        if self._arange.shape[0] < length:
            self._arange = torch.arange(length, device=self.device)
        return self._arange[:length].expand(rows, length)

    def run(
        self, model: torch.nn.Module, parts: list[Part], loss: LossFn, forward_only: bool
    ) -> list[dict[str, torch.Tensor]]:
        """`parts` through `model` as micro-batches; returns what `loss(part, output)`
        reported per micro-batch (on the last pipeline stage; nothing elsewhere). A part with
        a `response` gets logits at its response positions only (`forward`)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(data: Iterator[Part], model: torch.nn.Module) -> Any:
            part = next(data)
            rows, length = part.batch.tokens.shape
            index = part.response.logit_index if part.response is not None else None
            output = forward(
                model,
                part.batch.tokens,
                self.positions(rows, length),
                self.mask(length),
                index,
            )
            return output, partial(loss, part)

        # Micro-batches differ in shape; under pipeline parallelism the p2p exchange sends
        # each one's (variable_seq_lengths): these are the largest.
        out = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(parts),
            model=[model],
            num_microbatches=len(parts),
            seq_length=max(p.batch.tokens.shape[1] for p in parts),
            micro_batch_size=max(p.batch.tokens.shape[0] for p in parts),
            forward_only=forward_only,
        )
        return [o for o in out if o] if isinstance(out, list) else []
