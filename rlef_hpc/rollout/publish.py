"""Standalone (disaggregated) rollout: the trainer publishes versioned policy weights in the
run directory on the shared filesystem; rollout workers in other jobs follow the newest.

    run_dir/weights/
      v00000012/              complete versions only (written under .tmp-*, then renamed)
        stage-0.safetensors   HF-named tensors, one file per pipeline stage
      latest                  the newest complete version, replaced atomically, last

The trainer writes a version while generation goes on elsewhere; a worker reads the newest
complete one: each engine process streams the tensors from the files itself
(`WeightFollower.refresh`).
Old versions are pruned, keeping the last few, so a worker that is still loading one is not
pulled out from under (it retries with the newest if it was).
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from rlef_hpc.checkpoint import atomic
from rlef_hpc.checkpoint.hf_dir import hf_weights
from rlef_hpc.models.config import ModelConfig

WEIGHTS = "weights"
LATEST = atomic.LATEST


def _name(version: int) -> str:
    return f"v{version:08d}"


def publish(
    run_dir: str | Path, version: int, model: torch.nn.Module, cfg: ModelConfig, keep_last: int = 3
) -> Path:
    """Collective over the model-parallel ranks of the trainer (every rank calls it): each
    pipeline stage's first tensor- and data-parallel rank writes its layers, HF-named."""
    from megatron.core import parallel_state as ps
    from safetensors.torch import save_file

    root = Path(run_dir) / WEIGHTS
    final, tmp = root / _name(version), root / f".tmp-{_name(version)}"
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    # Every TP rank takes part in the gathers; the split QKV and gate/up are views: copy them.
    tensors = {name: t.clone() for name, t in hf_weights(model, cfg)}
    if ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
        stage = ps.get_pipeline_model_parallel_rank()
        save_file(tensors, str(tmp / f"stage-{stage}.safetensors"), metadata={"format": "pt"})
    del tensors
    dist.barrier()
    if dist.get_rank() == 0:
        atomic.commit(tmp, final, version, "v*", keep_last)
    dist.barrier()
    return final


def latest_version(run_dir: str | Path) -> int | None:
    pointer = Path(run_dir) / WEIGHTS / LATEST
    return int(pointer.read_text()) if pointer.exists() else None


def read_published(run_dir: str | Path, version: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of a published version, one tensor read at a time."""
    from safetensors import safe_open

    path = Path(run_dir) / WEIGHTS / _name(version)
    files = sorted(path.glob("stage-*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no published weights")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, f.get_tensor(name)


class WeightFollower:
    """Keeps an engine (anything with `update_weights_from`, as VLLMGenerator) on the newest
    published version."""

    def __init__(self, engine: Any, run_dir: str | Path) -> None:
        self.engine, self.run_dir = engine, Path(run_dir)
        self.version: int | None = None

    def refresh(self) -> int | None:
        """Loads the newest version if it is newer than the engine's; returns the engine's."""
        for _ in range(3):  # a version pruned while we read it: take the newer one
            newest = latest_version(self.run_dir)
            if newest is None or newest == self.version:
                return self.version
            # The engine's processes read the files (the reader pickles: paths, not tensors).
            load = functools.partial(read_published, str(self.run_dir), newest)
            try:
                self.engine.update_weights_from(load)
            except Exception:
                # Seen from here as whatever vLLM's worker processes make of a FileNotFoundError.
                if (self.run_dir / WEIGHTS / _name(newest)).is_dir():
                    raise
                continue
            self.version = newest
            return newest
        raise RuntimeError(f"{self.run_dir}: published weights keep vanishing while loading")
