"""Hugging Face model directories (the families of rlef_hpc.models.config): the one place that
reads and writes them.

What vLLM starts from, what users import and export, and the run's `init/` policy are all
such directories: config.json, safetensors shards with their index, the tokenizer's files.
Reading builds megatron models for the current TP x PP layout from one; writing takes a stream
of HF-named tensors (from a live model: `hf_weights`; from a checkpoint on disk: convert.py).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import torch

from rlef_hpc.checkpoint.hf import megatron_from_hf, megatron_to_hf
from rlef_hpc.checkpoint.layout import full_of, global_name
from rlef_hpc.models.config import ARCHITECTURES, ModelConfig, PrecisionConfig

# What travels beside the weights: the tokenizer (BPE files of Qwen's and Llama-2's too), its
# chat template, and generation_config.json (the ids generate() stops at).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
)
# The special token ids a model's config and generation_config.json carry.
SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id")
SHARD_BYTES = 2 << 30


class CheckpointError(ValueError):
    """Not a checkpoint, a missing shard, an unsupported model: one line for the user."""


def read_model_config(hf_dir: Path) -> ModelConfig:
    config = hf_dir / "config.json"
    if not config.exists():
        raise CheckpointError(f"{hf_dir} is not a Hugging Face model directory (no config.json)")
    try:
        return ModelConfig.from_hf(config)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{config}: {e}") from None


_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def _weight_files(hf_dir: Path) -> list[Path]:
    """The directory's safetensors shards: those its index lists, else every one there."""
    index = hf_dir / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        names = [p.name for p in sorted(hf_dir.glob("*.safetensors"))]
    if not names:
        raise CheckpointError(f"{hf_dir}: no safetensors weights")
    for name in names:
        if not (hf_dir / name).exists():
            raise CheckpointError(f"{hf_dir}: missing shard {name} (listed in the index)")
    return [hf_dir / name for name in names]


def stored_dtype(hf_dir: Path) -> str:
    """The dtype the directory's weights are stored in (its first tensor's), read from the
    first shard's header alone."""
    first = _weight_files(hf_dir)[0]
    with open(first, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    stored = next(v["dtype"] for k, v in header.items() if k != "__metadata__")
    if stored not in _SAFETENSORS_DTYPES:
        raise CheckpointError(f"{first}: weights stored as {stored}, not a float type")
    return _SAFETENSORS_DTYPES[stored]


class HFTensors:
    """Reads single tensors, or one chunk of one, from an HF directory's safetensors shards:
    only the bytes asked for leave the file. Each read maps its shard and unmaps it after, so
    what a reader holds in memory is what it returned, not the pages it looked at."""

    def __init__(self, hf_dir: Path) -> None:
        from safetensors import safe_open

        self.files: dict[str, Path] = {}
        for path in _weight_files(hf_dir):
            with safe_open(path, framework="pt") as f:
                self.files.update(dict.fromkeys(f.keys(), path))

    def read(
        self, name: str, dim: int | None = None, index: int = 0, parts: int = 1
    ) -> torch.Tensor:
        """Tensor `name`, or with `dim` its chunk `index` of `parts` equal ones along `dim`."""
        from safetensors import safe_open

        if name not in self.files:
            raise CheckpointError(f"the Hugging Face checkpoint has no {name!r}")
        with safe_open(self.files[name], framework="pt") as f:
            if dim is None or parts == 1:
                return f.get_tensor(name)
            block = f.get_slice(name)
            size = block.get_shape()[dim]
            if size % parts:
                raise CheckpointError(f"{name}: {size} rows along dim {dim} in {parts} parts")
            step = size // parts
            return block[(slice(None),) * dim + (slice(index * step, (index + 1) * step),)]


def build_from_hf(
    hf_dir: Path,
    cfg: ModelConfig,
    precision: PrecisionConfig,
    kinds: Sequence[Literal["policy", "value"]],
) -> list[Any]:
    """One megatron model of this rank's pipeline stage and tensor-parallel slice per kind,
    loaded from the HF directory: a policy takes every weight, a value model the trunk with a
    fresh head. Each rank reads only its own stage's tensors and of those only its
    tensor-parallel chunk, each once for all the models: at 70B a rank's host memory is its
    shard of the models plus one tensor, not the 140 GB checkpoint. Parallel state must be
    initialised."""
    from megatron.core import parallel_state as ps

    from rlef_hpc.models.gpt import build_gpt

    models = [build_gpt(cfg, precision, value=kind == "value") for kind in kinds]
    stage = ps.get_pipeline_model_parallel_rank()
    per_stage = cfg.num_layers // ps.get_pipeline_model_parallel_world_size()
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    tensors = HFTensors(hf_dir)

    def read(name: str, dim: int | None) -> torch.Tensor:
        return tensors.read(name, dim, tp_rank, tp)

    targets: dict[str, list[torch.nn.Parameter]] = {}
    for kind, model in zip(kinds, models, strict=True):
        for name, param in model.named_parameters():
            if not (kind == "value" and name.startswith("output_layer")):  # a fresh head
                targets.setdefault(name, []).append(param)
    with torch.no_grad():
        for name, params in targets.items():
            param = params[0]
            split = getattr(param, "tensor_model_parallel", False) and tp > 1
            key = global_name(name, stage, per_stage)
            shard = megatron_from_hf(key, cfg, read, param.partition_dim if split else None)
            if shard.shape != param.shape:
                raise CheckpointError(
                    f"{hf_dir}: {key} is {tuple(shard.shape)} on this rank, the model's "
                    f"{tuple(param.shape)} (config.json does not describe these weights?)"
                )
            for p in params:
                p.copy_(shard)
            del shard
    return models


def hf_weights(model: torch.nn.Module, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) for this pipeline stage's parameters, gathered over the
    tensor-parallel group (collective: every rank of the group must iterate)."""
    from megatron.core import parallel_state as ps

    stage = ps.get_pipeline_model_parallel_rank()
    per_stage = cfg.num_layers // ps.get_pipeline_model_parallel_world_size()
    group, tp = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size()
    for name, param in model.named_parameters():
        full = full_of(name, param, group, tp)
        yield from megatron_to_hf(global_name(name, stage, per_stage), full, cfg)


def engine_weights(model: torch.nn.Module, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """What a vLLM engine is sent at each refit (in memory, as published files, over the weight
    bus): `hf_weights`, and with tied embeddings `lm_head.weight` beside the last stage's
    `model.embed_tokens.weight` (the same tensor; megatron holds one). vLLM ties the LM head to
    the embedding (LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM: `lm_head.tie_weights`)
    but its in-place reload (model_executor/model_loader/reload/layerwise.py) restores and
    re-processes each layer on its own: a layer sent nothing keeps its kernel tensors as they
    were ("ParallelLMHead: Failed to load weights"), and on CPU the head's GEMM keeps a packed
    copy of the old embedding (dispatch_cpu_unquantized_gemm): the engine sampled from a stale
    output layer. Sent to both, each layer loads the same values."""
    from megatron.core import parallel_state as ps

    head = cfg.tie_embeddings and ps.is_pipeline_last_stage()  # PP > 1: its own copy is sent
    for name, tensor in hf_weights(model, cfg):
        yield name, tensor
        if head and name == "model.embed_tokens.weight":
            yield "lm_head.weight", tensor


def hf_config(cfg: ModelConfig, dtype: str, source: dict[str, Any] | None = None) -> dict[str, Any]:
    """config.json of a model of shape `cfg` stored in `dtype`: the fields of the `source`
    model's config.json (special token ids, settings its architecture reads that megatron's
    model does not change), with the shape's own over them. Raises CheckpointError if the
    result would not describe `cfg` (a source config of another model)."""
    source = {k: v for k, v in (source or {}).items() if k != "quantization_config"}
    config: dict[str, Any] = {
        "architectures": [ARCHITECTURES[cfg.family]],
        "model_type": cfg.family,
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
    }
    if cfg.family != "qwen2":  # Qwen2's q/k/v biases are not a setting
        config["attention_bias"] = False
    elif cfg.kv_channels is None:  # Qwen2's config has no head_dim (hidden / heads)
        config.pop("head_dim")
    if cfg.family == "llama":
        config["mlp_bias"] = False
    else:
        config["use_sliding_window"] = False
    if cfg.rope_scaling:
        config["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": cfg.rope_scaling_factor,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    if "rope_parameters" in source:  # transformers >= 5 reads RoPE from there alone
        rope = {**source["rope_parameters"], "rope_theta": cfg.rope_theta}
        config["rope_parameters"] = {**rope, **config.pop("rope_scaling", {})}
        config.pop("rope_theta")
    dtype_key = "dtype" if "dtype" in source and "torch_dtype" not in source else "torch_dtype"
    merged = {**source, **config, dtype_key: dtype}
    try:
        described = ModelConfig.from_hf(merged)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"config.json: {e}") from None
    if described != cfg:
        raise CheckpointError(f"config.json would describe {described}, the weights are {cfg}")
    return merged


def generation_config(config: dict[str, Any]) -> dict[str, Any]:
    """generation_config.json of a model whose source had none: its config's special token
    ids, where generate() starts, pads and stops."""
    return {k: config[k] for k in SPECIAL_TOKENS if config.get(k) is not None}


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


def copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, dst / name)


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    """An HF directory's config.json as it is (what an export of its weights carries on)."""
    return json.loads((hf_dir / "config.json").read_text())


def checkpoint_model_config(cfg: ModelConfig, dtype: str, hf_dir: Path | None) -> dict[str, Any]:
    """model_config.json of a model or training checkpoint: the shape, the dtype, and the
    config.json of the HF model it came from (`hf_dir`; None for a scratch model), so that an
    export writes every field the source had."""
    source = read_hf_config(hf_dir) if hf_dir is not None else None
    return {**asdict(cfg), "dtype": dtype, "hf_config": source}


def split_model_config(fields: dict[str, Any]) -> tuple[ModelConfig, str, dict[str, Any] | None]:
    """checkpoint_model_config's fields -> (shape, dtype, source config)."""
    fields = dict(fields)
    dtype, source = fields.pop("dtype", "float32"), fields.pop("hf_config", None)
    return ModelConfig(**fields), dtype, source


def write_hf_dir(
    out_dir: Path,
    weights: Iterable[tuple[str, torch.Tensor]],
    cfg: ModelConfig,
    dtype: str,
    tokenizer: Path | Any,
    config: dict[str, Any] | None = None,
    shard_bytes: int = SHARD_BYTES,
    source: dict[str, Any] | None = None,
) -> int:
    """HF-named tensors (cast to `dtype`) as shards written as they fill, config.json
    (`hf_config` of `cfg` over the `source` model's config, updated by `config`), the tokenizer
    (a directory to copy its files from, or a tokenizer object to save) and
    generation_config.json (the tokenizer directory's, else made from config.json). Returns how
    many tensors were written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out_dir, shard_bytes)
    target = getattr(torch, dtype)
    count = 0
    for name, tensor in weights:
        writer.add(name, tensor.to(target).contiguous())
        count += 1
    writer.close()
    if isinstance(tokenizer, Path):
        copy_tokenizer(tokenizer, out_dir)
    else:
        tokenizer.save_pretrained(out_dir)
    full = {**hf_config(cfg, dtype, source), **(config or {})}
    if not (out_dir / "generation_config.json").exists():
        (out_dir / "generation_config.json").write_text(
            json.dumps(generation_config(full), indent=2)
        )
    # Last: a directory with config.json is complete (rlef_hpc.launch.jobs relies on it).
    (out_dir / "config.json").write_text(json.dumps(full, indent=2))
    return count


def save_model(
    model: torch.nn.Module,
    cfg: ModelConfig,
    dtype: str,
    tokenizer: Any,
    out: Path,
    source: Path | None = None,
) -> None:
    """A live policy as an HF directory at `out`, replaced atomically, with the config fields
    and generation_config.json of the HF model in `source` (None: a scratch model). Collective
    over the tensor-parallel group (the gathers); rank 0 writes, so one pipeline stage only
    (the warm start's layout)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() != 1:
        raise ValueError("save_model writes one pipeline stage; got pipeline parallelism")
    weights = list(hf_weights(model, cfg))  # every rank takes part in the gathers
    if dist.get_rank() == 0:
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        if source is None:
            ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
            write_hf_dir(tmp, weights, cfg, dtype, tokenizer, ids)
        else:  # the tokenizer is the source's: its files, chat template and generation config
            write_hf_dir(tmp, weights, cfg, dtype, source, source=read_hf_config(source))
        os.replace(tmp, out)
    dist.barrier()


def copy_hf_dir(src: Path, out: Path) -> None:
    """`out` as a copy of the HF directory's weights, config and tokenizer (not whatever else
    it holds, e.g. Llama's original/ consolidated checkpoint), replaced atomically."""
    if not (src / "config.json").exists():
        raise CheckpointError(f"model.hf_dir={src} is not a Hugging Face model directory")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    names = ("config.json", "model.safetensors.index.json", *TOKENIZER_FILES)
    for f in src.iterdir():
        if f.name in names or f.suffix == ".safetensors":
            shutil.copy(f, tmp / f.name)
    os.replace(tmp, out)
