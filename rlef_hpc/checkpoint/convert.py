"""Hugging Face Llama directories <-> megatron torch_dist model checkpoints.

A model checkpoint directory holds `policy/` (and `value/`, from import) in megatron's
torch_dist format, loadable at any TP/PP, and `model_config.json` (our ModelConfig) beside
the tokenizer files. Conversion runs in one process, on CPU, at TP=1/PP=1.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from rlef_hpc.checkpoint.hf import hf_to_megatron, megatron_to_hf
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


class _ShardWriter:
    """Safetensors shards of at most SHARD_BYTES, written as they fill, and the index."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.pending: dict[str, torch.Tensor] = {}
        self.size = 0
        self.files: list[list[str]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.size + nbytes > SHARD_BYTES:
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


def export_hf(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    dtype: str | None = None,
    value_model: bool = False,
    tokenizer: str | Path | None = None,
) -> Path:
    """A model checkpoint -> HF Llama directory (sharded safetensors written as they fill, the
    index, config.json, tokenizer files from the checkpoint or from `tokenizer`). The model is
    loaded whole, at TP=1/PP=1, in this one process."""
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    single_process()
    model, cfg, saved_dtype = load_model_checkpoint(ckpt_dir, "value" if value_model else "policy")
    target = getattr(torch, dtype or saved_dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(out_dir)
    for name, param in model.named_parameters():  # TP=1, PP=1: names are global already
        for hf_name, part in megatron_to_hf(name, param.detach(), cfg, value_model):
            writer.add(hf_name, part.to(target).contiguous().clone())
    writer.close()
    config = hf_config(cfg, str(target).removeprefix("torch."))
    if value_model:
        config["architectures"] = ["LlamaModel"]
        config["rlef_value_head"] = {"weight": "value_head.weight", "bias": "value_head.bias"}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    _copy_tokenizer(Path(tokenizer) if tokenizer else ckpt_dir, out_dir)
    return out_dir
