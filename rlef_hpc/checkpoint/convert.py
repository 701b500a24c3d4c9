"""Hugging Face Llama directories <-> megatron torch_dist model checkpoints.

A model checkpoint directory holds `policy/` (and `value/`, from import) in megatron's
torch_dist format, loadable at any TP/PP, and `model_config.json` (our ModelConfig) beside
the tokenizer files. Conversion runs in one process, on CPU, at TP=1/PP=1.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from rlef_hpc.checkpoint.hf import checkpoint_key_to_name, hf_to_megatron, megatron_to_hf
from rlef_hpc.checkpoint.layout import load_full_state
from rlef_hpc.models.config import ModelConfig, PrecisionConfig

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)
SHARD_BYTES = 2 << 30


class CheckpointError(ValueError):
    """Not a checkpoint, a missing shard, an unsupported model: one line for the user."""


def single_process() -> None:
    """A one-rank gloo group and TP=1/PP=1 parallel state, as conversion needs."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29400 + os.getpid() % 1000))
        dist.init_process_group("gloo", rank=0, world_size=1)
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(1, 1)


def read_hf_state(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = hf_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [p.name for p in sorted(hf_dir.glob("*.safetensors"))]
    if not files:
        raise CheckpointError(f"{hf_dir}: no safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        if not (hf_dir / name).exists():
            raise CheckpointError(f"{hf_dir}: missing shard {name} (listed in the index)")
        state.update(load_file(hf_dir / name))
    return state


def _model_config(hf_dir: Path) -> ModelConfig:
    config = hf_dir / "config.json"
    if not config.exists():
        raise CheckpointError(f"{hf_dir} is not a Hugging Face model directory (no config.json)")
    try:
        return ModelConfig.from_hf(config)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{config}: {e}") from None


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, dst / name)


def import_hf(hf_dir: str | Path, out_dir: str | Path, value_model: bool = True) -> ModelConfig:
    """HF Llama -> torch_dist policy (and a value model from the same weights, new head)."""
    from megatron.core import dist_checkpointing

    from rlef_hpc.models.gpt import build_gpt
    from rlef_hpc.models.megatron_compat import seed

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    cfg = _model_config(hf_dir)
    state = hf_to_megatron(read_hf_state(hf_dir), cfg)
    dtype = next(iter(state.values())).dtype
    precision = PrecisionConfig(str(dtype).removeprefix("torch."))
    single_process()
    seed(0)
    out_dir.mkdir(parents=True, exist_ok=True)
    kinds = [("policy", False)] + ([("value", True)] if value_model else [])
    for kind, is_value in kinds:
        model = build_gpt(cfg, precision, value=is_value)
        trunk = {k: v for k, v in state.items() if not (is_value and k.startswith("output_layer"))}
        load_full_state(model, trunk, cfg.num_layers, strict=not is_value)
        (out_dir / kind).mkdir(exist_ok=True)
        dist_checkpointing.save(model.sharded_state_dict(), str(out_dir / kind))
    (out_dir / "model_config.json").write_text(
        json.dumps({**asdict(cfg), "dtype": precision.dtype})
    )
    _copy_tokenizer(hf_dir, out_dir)
    return cfg


def load_model_checkpoint(ckpt_dir: Path, kind: str = "policy") -> tuple[Any, ModelConfig, str]:
    """Builds a model for the current layout and loads `kind` from a model checkpoint."""
    from megatron.core import dist_checkpointing

    from rlef_hpc.models.gpt import build_gpt

    cfg, dtype = _read_model_config(ckpt_dir)
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


def hf_config(cfg: ModelConfig, dtype: str, tokenizer: Any = None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": dtype,
    }
    if cfg.rope_scaling:
        config["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": cfg.rope_scaling_factor,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    return config


def _read_model_config(ckpt_dir: Path) -> tuple[ModelConfig, str]:
    meta = ckpt_dir / "model_config.json"
    if not meta.exists():
        raise CheckpointError(f"{ckpt_dir} is not a model checkpoint (no model_config.json)")
    fields = json.loads(meta.read_text())
    dtype = fields.pop("dtype", "float32")
    return ModelConfig(**fields), dtype


class ShardWriter:
    """Safetensors shards of at most `shard_bytes`, written as they fill, and the index."""

    def __init__(self, out_dir: Path, shard_bytes: int = SHARD_BYTES) -> None:
        self.out_dir, self.shard_bytes = out_dir, shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.size = 0
        self.files: list[list[str]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.size + nbytes > self.shard_bytes:
            self._flush()
        self.pending[name] = tensor
        self.size += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(
            self.pending,
            str(self.out_dir / f"part-{len(self.files)}.tmp"),
            metadata={"format": "pt"},
        )
        self.files.append(list(self.pending))
        self.pending, self.size = {}, 0

    def close(self) -> None:
        if self.pending:
            self._flush()
        weight_map = {}
        for i, names in enumerate(self.files):  # final names need the count of shards
            final = f"model-{i + 1:05d}-of-{len(self.files):05d}.safetensors"
            os.replace(self.out_dir / f"part-{i}.tmp", self.out_dir / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


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
    """A model (or training) checkpoint -> HF Llama directory: config.json, tokenizer files
    from the checkpoint or from `tokenizer`, safetensors shards written as they fill, and
    their index. Streams: reads one layer at a time from the torch_dist files, builds no
    model and needs no process group, so peak memory is about one layer plus one shard."""
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    cfg, saved_dtype = _read_model_config(ckpt_dir)
    kind = "value" if value_model else "policy"
    if not (ckpt_dir / kind).is_dir():
        raise CheckpointError(f"{ckpt_dir} is not a model checkpoint (no {kind}/)")
    target = getattr(torch, dtype or saved_dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out_dir, shard_bytes)
    seen = 0
    for name, tensor in stream_checkpoint(ckpt_dir / kind, getattr(torch, saved_dtype)):
        seen += 1
        for hf_name, part in megatron_to_hf(name, tensor, cfg, value_model):
            writer.add(hf_name, part.to(target).contiguous())
    expected = 3 + 6 * cfg.num_layers + (1 if value_model else 0) - (1 if cfg.tie_embeddings else 0)
    if seen != expected:
        raise CheckpointError(
            f"{ckpt_dir / kind}: {seen} of the {expected} tensors of a {cfg.num_layers}-layer model"
        )
    writer.close()
    config = hf_config(cfg, str(target).removeprefix("torch."))
    if value_model:
        config["architectures"] = ["LlamaModel"]
        config["rlef_value_head"] = {"weight": "value_head.weight", "bias": "value_head.bias"}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    _copy_tokenizer(Path(tokenizer) if tokenizer else ckpt_dir, out_dir)
    return out_dir
