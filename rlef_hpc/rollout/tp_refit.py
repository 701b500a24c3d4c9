"""Refit of a colocated engine at tensor parallelism > 1: each training process's tensor-
parallel shards straight into its own engine's shards, in place, without gathering whole tensors.

A colocated engine runs in the trainer's processes at the trainer's TP size (vLLM's
external_launcher), and vLLM numbers its tensor-parallel ranks as megatron does (consecutive
ranks, vllm/distributed/parallel_state.py initialize_model_parallel; megatron's default order
"tp-cp-ep-dp-pp"), so rank r of a trainer's TP group is rank r of its engine. The two shard
the same way wherever it matters:

- q/k/v: megatron's rank holds a contiguous block of query groups (fused group-major), vLLM's
  QKVParallelLinear the same heads and KV heads (TP <= KV heads: no replication);
- gate/up: megatron's linear_fc1 shard is [gate rows; up rows] of the rank, vLLM's
  MergedColumnParallelLinear shard the same; o_proj/down_proj: the same input columns;
- the vocabulary (embedding, LM head): megatron cuts vocab_size / TP rows a rank, vLLM pads the
  vocabulary to a multiple of 64 first (vocab_parallel_embedding.py, pad_vocab_size), so the
  cuts coincide exactly when vLLM adds no padding: Llama 3's 128,256 = 64 x 2,004 at any TP
  vLLM accepts. Otherwise (the CPU tests' tiny vocabularies) those two tensors are gathered and
  vLLM slices them, as before.
- norms are replicated: whole, as they are.

The trainer side renames and splits the shards with the one HF mapping (rlef_hpc.checkpoint.
hf: split_qkv and the gate/up split take a rank's shard as they take the whole). The engine
side goes through vLLM's own in-place reload (worker.reload_weights: layer-wise, re-packing
for the CPU GEMM), whose weight loaders would narrow a full tensor to the rank's rows; a shard
must be copied as it is. vLLM's loaders have that path: ColumnParallel/RowParallelLinear's
`weight_loader` skips the narrowing for a parameter marked `is_sharded_weight`, and the v2
loaders of vLLM parameters (BasevLLMParameter: load_qkv_weight, load_merged_column_weight,
load_row_parallel_weight in vllm/model_executor/parameter.py) narrow at `tp_rank x shard`,
which is the whole shard at tp_rank 0 (vLLM's own loaders pass rank 0 for replicated
weights). For the length of one reload, `_loading_shards` sets those on the parameters the
reload loads into (the layer-wise reload's model-format copies: vllm/model_executor/
model_loader/reload/layerwise.py) and restores them after.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from rlef_hpc.checkpoint.hf import megatron_to_hf
from rlef_hpc.checkpoint.hf_dir import with_tied_head
from rlef_hpc.checkpoint.layout import full_of, global_name

# megatron parameters split along the vocabulary (local spec names)
_VOCAB = ("embedding.word_embeddings.weight", "output_layer.weight")
_UNSET = object()


def rank_weights(
    model: torch.nn.Module, cfg: Any, vocab_shards: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of this rank's part of the policy for its own engine rank: the
    tensor-parallel shards of the linear layers as they are (views of the parameters, copied
    by the engine), replicated tensors whole, and the vocabulary-parallel ones as shards when
    `vocab_shards` (the engine cuts the vocabulary as megatron does: `vocab_cuts_match`), else
    gathered whole over the group (collective: every rank of the group iterates). One
    pipeline stage (colocated engines refuse pipeline parallelism)."""
    from megatron.core import parallel_state as ps

    group, tp = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size()

    def pieces() -> Iterator[tuple[str, torch.Tensor]]:
        for name, param in model.named_parameters():
            key = global_name(name, 0, cfg.num_layers)
            split = getattr(param, "tensor_model_parallel", False) and tp > 1
            if split and (vocab_shards or key not in _VOCAB):
                tensor = param.detach()
            else:
                tensor = full_of(name, param, group, tp)
            yield from megatron_to_hf(key, tensor, cfg)

    # Tied embeddings: the LM head is sent too, or the engine's stays stale (engine_weights).
    yield from with_tied_head(pieces(), cfg)


def vocab_cuts_match(engine: Any, vocab_size: int, group: Any) -> bool:
    """Whether every rank's engine holds the same rows of the vocabulary as its trainer shard
    (rows [r V / TP, (r + 1) V / TP) of rank r): agreed over the tensor-parallel `group` (a
    gloo group), since a gather is collective."""
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    shard = vocab_size // tp
    ranges = engine.llm.collective_rpc(_vocab_ranges)[0]
    same = all(r == (rank * shard, (rank + 1) * shard) for r in ranges)
    agreed = torch.tensor([int(same)], device="cpu")
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=group)
    return bool(agreed.item())


def load_rank_weights(
    engine: Any, weights: Iterable[tuple[str, torch.Tensor]], vocab_shards: bool
) -> None:
    """`rank_weights` into this process's engine (in-process: external_launcher, or one
    process at TP 1), in place, then drops the prefixes cached with the old weights."""
    engine.llm.collective_rpc(_reload_rank_weights, args=(iter(weights), vocab_shards))
    engine.llm.reset_prefix_cache()


# --- in the engine's worker (collective_rpc) --------------------------------------------------


def _vocab_ranges(worker: Any) -> list[tuple[int, int]]:
    """The real-vocabulary rows [start, end) this rank's embedding and LM head hold."""
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    return [
        (m.shard_indices.org_vocab_start_index, m.shard_indices.org_vocab_end_index)
        for m in worker.get_model().modules()
        if isinstance(m, VocabParallelEmbedding)
    ]


def _reload_rank_weights(
    worker: Any, weights: Iterable[tuple[str, torch.Tensor]], vocab_shards: bool
) -> None:
    with _loading_shards(worker.get_model(), vocab_shards):
        worker.reload_weights(weights_iterator=weights, is_checkpoint_format=True)


def _copy_vocab_shard(param: torch.Tensor, loaded_weight: torch.Tensor) -> None:
    """VocabParallelEmbedding.weight_loader for a shard already cut: its rows, then the padding
    rows zeroed, as vLLM's loader leaves them."""
    rows = loaded_weight.shape[0]
    param.data[:rows].copy_(loaded_weight)
    param.data[rows:].fill_(0)


def _reload_targets(module: torch.nn.Module) -> list[torch.Tensor]:
    """The tensors a layer-wise reload registers on `module` and loads into: the model-format
    copies vLLM recorded when it loaded the model (a weight's), and the live ones it never moves
    to the meta device (a bias)."""
    from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info

    recorded = get_layerwise_info(module).restore_metadata[0]
    live = [p for n, p in module.named_parameters(recurse=False) if n not in recorded]
    return [*recorded.values(), *live]


@contextlib.contextmanager
def _loading_shards(model: torch.nn.Module, vocab_shards: bool) -> Iterator[None]:
    """For one reload: the tensor-parallel linear layers' loaders copy what they are given
    as this rank's shard, and (with `vocab_shards`) the vocabulary layers' too."""
    from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
    from vllm.model_executor.parameter import BasevLLMParameter

    saved: list[tuple[torch.Tensor, str, Any]] = []

    def put(tensor: torch.Tensor, attr: str, value: Any) -> None:
        saved.append((tensor, attr, getattr(tensor, attr, _UNSET)))
        setattr(tensor, attr, value)

    for module in model.modules():
        if getattr(module, "tp_size", 1) <= 1:
            continue
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            for tensor in _reload_targets(module):
                put(tensor, "is_sharded_weight", True)
                if isinstance(tensor, BasevLLMParameter):
                    put(tensor, "tp_rank", 0)
        elif vocab_shards and isinstance(module, VocabParallelEmbedding):
            for tensor in _reload_targets(module):
                # a function (vLLM reads its __name__ and signature when it wraps it)
                put(tensor, "weight_loader", _copy_vocab_shard)
    try:
        yield
    finally:
        for tensor, attr, old in reversed(saved):
            if old is _UNSET:
                delattr(tensor, attr)
            else:
                setattr(tensor, attr, old)
