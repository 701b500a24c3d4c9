"""Hugging Face directories (Llama, Qwen2, Qwen3) <-> megatron torch_dist model checkpoints.

A model checkpoint directory holds `policy/` (and `value/`, from import) in megatron's
torch_dist format, loadable at any TP/PP, and `model_config.json` (our ModelConfig, the dtype,
and the source's config.json) beside the tokenizer files and generation_config.json: what an
export needs to write the source's config back. Conversion runs in one process, on CPU, at
TP=1/PP=1.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from rlef_hpc.checkpoint.hf import checkpoint_key_to_name, megatron_names, megatron_to_hf
from rlef_hpc.checkpoint.hf_dir import (
    SHARD_BYTES,
    CheckpointError,
    build_from_hf,
    checkpoint_model_config,
    copy_tokenizer,
    read_model_config,
    split_model_config,
    stored_dtype,
    write_hf_dir,
)
from rlef_hpc.dist_env import init_process_groups
from rlef_hpc.models.config import ARCHITECTURES, ModelConfig, PrecisionConfig


def import_hf(hf_dir: str | Path, out_dir: str | Path, value_model: bool = True) -> ModelConfig:
    """HF model -> torch_dist policy (and a value model from the same weights, new head)."""
    from megatron.core import dist_checkpointing

    from rlef_hpc.models.megatron_compat import seed

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    cfg = read_model_config(hf_dir)
    precision = PrecisionConfig(stored_dtype(hf_dir))
    init_process_groups()
    seed(0)
    out_dir.mkdir(parents=True, exist_ok=True)
    kinds = ("policy", "value") if value_model else ("policy",)
    for kind, model in zip(kinds, build_from_hf(hf_dir, cfg, precision, kinds), strict=True):
        (out_dir / kind).mkdir(exist_ok=True)
        dist_checkpointing.save(model.sharded_state_dict(), str(out_dir / kind))
    (out_dir / "model_config.json").write_text(
        json.dumps(checkpoint_model_config(cfg, precision.dtype, hf_dir))
    )
    copy_tokenizer(hf_dir, out_dir)
    return cfg


def load_model_checkpoint(ckpt_dir: Path, kind: str = "policy") -> tuple[Any, ModelConfig, str]:
    """Builds a model for the current layout and loads `kind` from a model checkpoint."""
    from megatron.core import dist_checkpointing

    from rlef_hpc.models.gpt import build_gpt

    cfg, dtype, _ = _read_model_config(ckpt_dir)
    if not (ckpt_dir / kind).is_dir():
        raise CheckpointError(f"{ckpt_dir} is not a model checkpoint (no {kind}/)")
    model = build_gpt(cfg, PrecisionConfig(dtype), value=kind == "value")
    try:
        state = dist_checkpointing.load(model.sharded_state_dict(), str(ckpt_dir / kind))
    except Exception as e:  # noqa: BLE001 - megatron raises many kinds; the user needs one line
        raise CheckpointError(f"{ckpt_dir / kind}: cannot load ({type(e).__name__}: {e})") from None
    # A training checkpoint holds the optimizer's common state beside the model's.
    wanted = set(model.state_dict())
    model.load_state_dict({k: v for k, v in state.items() if k in wanted})
    return model, cfg, dtype


def _read_model_config(ckpt_dir: Path) -> tuple[ModelConfig, str, dict[str, Any] | None]:
    meta = ckpt_dir / "model_config.json"
    if not meta.exists():
        raise CheckpointError(f"{ckpt_dir} is not a model checkpoint (no model_config.json)")
    return split_model_config(json.loads(meta.read_text()))


def _read_slices(
    model_dir: Path, wanted: dict[str, tuple[tuple[int, ...], torch.Size]], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Reads, from a torch_dist directory, the block of each tensor `key` that starts at
    `offsets` and has `sizes` (whatever layout saved it), and only that block."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class Planner(DefaultLoadPlanner):
        def create_local_plan(self) -> LoadPlan:
            items = []
            for key, (offsets, sizes) in wanted.items():
                chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=sizes)
                stored = self.metadata.state_dict_metadata[key]
                items += create_read_items_for_chunk_list(key, stored, [chunk])
            return LoadPlan(items)

        def resolve_tensor(self, item: Any) -> torch.Tensor:
            tensor = out[item.dest_index.fqn]
            for dim, (start, length) in enumerate(
                zip(item.dest_offsets, item.lengths, strict=True)
            ):
                tensor = tensor.narrow(dim, start, length)
            return tensor

    out = {key: torch.empty(sizes, dtype=dtype) for key, (_, sizes) in wanted.items()}
    try:
        with warnings.catch_warnings():  # "assuming ... a single process": exactly the intent
            warnings.simplefilter("ignore", UserWarning)
            reader = dcp.FileSystemReader(model_dir)
            dcp.load(out, storage_reader=reader, planner=Planner(), no_dist=True)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - the user needs one line
        if isinstance(e, CheckpointException):  # a BaseException wrapping each rank's error
            e = next(iter(e.failures.values()))[0]
        raise CheckpointError(f"{model_dir}: cannot read ({type(e).__name__}: {e})") from None
    return out


def stream_checkpoint(model_dir: Path, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(megatron parameter name at TP=1/PP=1, full tensor) read straight from a torch_dist
    directory saved at any layout: the global tensors, then one layer at a time, so that no
    more than one layer's weights are ever in memory. The optimizer's state is not read."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if not (model_dir / ".metadata").exists():
        raise CheckpointError(f"{model_dir} is not a torch_dist checkpoint (no .metadata)")
    stored = dcp.FileSystemReader(model_dir).read_metadata().state_dict_metadata
    keys = {
        k: md.size
        for k, md in stored.items()
        if isinstance(md, TensorStorageMetadata) and checkpoint_key_to_name(k, 0) is not None
    }
    layered = {k: size for k, size in keys.items() if k.startswith("decoder.layers.")}
    for key, size in keys.items():
        if key not in layered:
            tensor = _read_slices(model_dir, {key: ((0,) * len(size), size)}, dtype)[key]
            yield checkpoint_key_to_name(key, 0), tensor
    num_layers = min((size[0] for size in layered.values()), default=0)
    for layer in range(num_layers):
        wanted = {
            k: ((layer,) + (0,) * (len(size) - 1), torch.Size((1, *size[1:])))
            for k, size in layered.items()
        }
        for key, tensor in _read_slices(model_dir, wanted, dtype).items():
            yield checkpoint_key_to_name(key, layer), tensor[0]


def export_hf(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    dtype: str | None = None,
    value_model: bool = False,
    tokenizer: str | Path | None = None,
    shard_bytes: int = SHARD_BYTES,
) -> Path:
    """A model (or training) checkpoint -> HF directory: config.json (the source model's, with
    the checkpoint's shape and dtype), tokenizer files and generation_config.json from the
    checkpoint or from `tokenizer`, safetensors shards written as they fill, and their index.
    Streams: reads one layer at a time from the torch_dist files, builds no model and needs
    no process group, so peak memory is about one layer plus one shard."""
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    cfg, saved_dtype, source = _read_model_config(ckpt_dir)
    kind = "value" if value_model else "policy"
    if not (ckpt_dir / kind).is_dir():
        raise CheckpointError(f"{ckpt_dir} is not a model checkpoint (no {kind}/)")
    # the value head: output_layer.weight and .bias, in the tied output layer's place or beside
    head = (2 if cfg.tie_embeddings else 1) if value_model else 0
    expected = len(megatron_names(cfg)) + head

    def weights() -> Iterator[tuple[str, torch.Tensor]]:
        seen = 0
        for name, tensor in stream_checkpoint(ckpt_dir / kind, getattr(torch, saved_dtype)):
            seen += 1
            yield from megatron_to_hf(name, tensor, cfg, value_model)
        if seen != expected:  # before the index and config.json: no usable-looking directory
            raise CheckpointError(
                f"{ckpt_dir / kind}: {seen} of the {expected} tensors of a "
                f"{cfg.num_layers}-layer model"
            )

    config = {}
    if value_model:  # the trunk (e.g. LlamaModel) and the head beside it
        config["architectures"] = [ARCHITECTURES[cfg.family].replace("ForCausalLM", "Model")]
        config["rlef_value_head"] = {"weight": "value_head.weight", "bias": "value_head.bias"}
    tokenizer_dir = Path(tokenizer) if tokenizer else ckpt_dir
    write_hf_dir(
        out_dir,
        weights(),
        cfg,
        dtype or saved_dtype,
        tokenizer_dir,
        config,
        shard_bytes,
        source=source,
    )
    return out_dir
