"""Standalone (disaggregated) rollout: the trainer publishes versioned policy weights in the
run directory on the shared filesystem; rollout workers in other jobs follow the newest.

    run_dir/weights/
      v00000012/              complete versions only (written under .tmp-*, then renamed)
        stage-0/              one folder per pipeline stage: HF-named tensors in
          model-00001-of-00035.safetensors   shards written as they fill, and their index
          model.safetensors.index.json
      latest                  the newest complete version, replaced atomically, last

The trainer writes a version while generation goes on elsewhere; a worker reads the newest
complete one: each engine process streams the tensors from the files itself
(`WeightFollower.refresh`).
Old versions are pruned, keeping the last few, so a worker that is still loading one is not
pulled out from under (it retries with the newest if it was).
"""

from __future__ import annotations

import functools
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from rlef_hpc.checkpoint import atomic
from rlef_hpc.checkpoint.hf_dir import ShardWriter, engine_weights
from rlef_hpc.models.config import ModelConfig
from rlef_hpc.rollout.bus import BusReceiver, receive

logger = logging.getLogger(__name__)

WEIGHTS = "weights"
LATEST = atomic.LATEST
# A writer's host memory beyond the model: a shard fills before it is written (the peers'
# refit buckets are 0.5-2 GB; Llama-70B's largest tensor, the embedding, is 2.1 GB in bf16).
PUBLISH_SHARD_BYTES = 1 << 30


def _name(version: int) -> str:
    return f"v{version:08d}"


def publish(
    run_dir: str | Path,
    version: int,
    model: torch.nn.Module,
    cfg: ModelConfig,
    keep_last: int = 3,
    shard_bytes: int = PUBLISH_SHARD_BYTES,
) -> Path:
    """Collective over the trainer's ranks (every rank calls it). In the first data-parallel
    replica, each pipeline stage's tensor-parallel group gathers the stage's tensors one at a
    time (`engine_weights`) and its first rank writes them, HF-named, to shards of at most
    `shard_bytes` as they fill: beyond the model, a writer holds one shard and the tensor in
    hand (not the stage's whole weights: 35 GB at 70B), the group's other ranks only the tensor
    being gathered. The other replicas hold the same weights: they neither gather nor write."""
    from megatron.core import parallel_state as ps

    root = Path(run_dir) / WEIGHTS
    final, tmp = root / _name(version), root / f".tmp-{_name(version)}"
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    if ps.get_data_parallel_rank() == 0:
        writer = None
        if ps.get_tensor_model_parallel_rank() == 0:
            stage = tmp / f"stage-{ps.get_pipeline_model_parallel_rank()}"
            stage.mkdir()
            writer = ShardWriter(stage, shard_bytes)
        for name, tensor in engine_weights(model, cfg):  # every TP rank takes part in the gathers
            if writer is not None:
                # A host copy of its own: the split QKV and gate/up are views of one gathered
                # tensor (safetensors refuses shared storage), and a GPU's tensor must not
                # wait in device memory for its shard to fill.
                writer.add(name, tensor.to("cpu", copy=True))
        if writer is not None:
            writer.close()
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
    files = sorted(path.glob("stage-*/*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no published weights")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, f.get_tensor(name)


class WeightFollower:
    """Keeps an engine (anything with `update_weights_from`, as VLLMGenerator) on the newest
    policy version: from the weight bus when the trainer runs one and its round for a newer
    version is open, else from the published files (the fallback: a round this worker missed,
    or one that failed)."""

    def __init__(self, engine: Any, run_dir: str | Path, bus: BusReceiver | None = None) -> None:
        self.engine, self.run_dir, self.bus = engine, Path(run_dir), bus
        self.version: int | None = None
        self.via = ""  # where the engine's version came from: "bus" or "files"
        # The engine holds part of a version (a round failed mid-stream): any complete one
        # must be loaded before it generates again.
        self.partial = False

    def refresh(self) -> int | None:
        """Loads the newest version if it is newer than the engine's; returns the engine's."""
        if self.bus is not None and not self.partial and self._from_bus():
            return self.version
        return self._from_files()

    def _from_bus(self) -> bool:
        assert self.bus is not None
        announced = self.bus.announced()
        if announced is None or (self.version is not None and announced <= self.version):
            return False
        try:
            round_ = self.bus.join(announced)
        except Exception as e:  # noqa: BLE001 - the trainer went away: the files remain
            logger.warning("weight bus: could not join version %d (%s)", announced, e)
            return False
        if round_ is None:
            return False  # it closed without us: the trainer publishes the files
        try:
            self.engine.update_weights_from(functools.partial(receive, round_))
        except Exception as e:  # noqa: BLE001 - seen as whatever vLLM's workers make of it
            logger.warning("weight bus: version %d failed (%s); loading the files", announced, e)
            self.partial = True
            return False
        self.version, self.via = announced, "bus"
        return True

    def _from_files(self) -> int | None:
        for _ in range(3):  # a version pruned while we read it: take the newer one
            newest = latest_version(self.run_dir)
            current = -1 if self.version is None or self.partial else self.version
            if newest is None or newest <= current:  # the bus may be ahead of the files
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
            self.version, self.partial, self.via = newest, False, "files"
            return newest
        raise RuntimeError(f"{self.run_dir}: published weights keep vanishing while loading")
