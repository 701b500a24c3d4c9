"""megatron-core on CPU: the few narrow shims it needs where it assumes CUDA. Active only
without CUDA, written for (and checked against) one megatron-core version, in one place.

The shim is a stand-in for the name `torch` inside the few megatron modules that call CUDA
unconditionally (the current device for RoPE and buffers, "cuda" tensors in the pipeline
schedules, synchronize() in p2p and in the checkpoint writers): there,
torch.cuda.current_device() is the CPU, synchronize() does nothing, and tensors asked for on
"cuda" are made on the CPU. Everything else, and every other module, sees the real torch.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from typing import Any

import torch

from rlef_hpc.models import megatron_private

SUPPORTED = ("0.16.1",)
# The modules of megatron-core 0.16.1 that call CUDA whatever the configuration.
PATCHED_MODULES = (
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.transformer.utils",
    "megatron.core.utils",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.tensor_parallel.random",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
)
# Modules that check a tensor's legacy type name ("torch.cuda.FloatTensor") before they accept it.
TYPE_CHECKING_MODULES = frozenset(
    (
        "megatron.core.optimizer.optimizer",
        "megatron.core.optimizer.distrib_optimizer",
        "megatron.core.optimizer.clip_grads",
    )
)
_installed = False
# megatron's import-time warnings that Transformer Engine and apex are absent (0.16.1's words).
NOT_INSTALLED = r"(Transformer Engine and )?Apex (are|is) not installed"


def _cpu_device(kwargs: dict[str, Any]) -> dict[str, Any]:
    device = kwargs.get("device")
    if device is not None and str(device).startswith("cuda") or isinstance(device, int):
        kwargs["device"] = "cpu"
    return kwargs


class _CudaOnCpu:
    def current_device(self) -> torch.device:
        return torch.device("cpu")

    def synchronize(self, *args: Any, **kwargs: Any) -> None:
        return None

    # The model-parallel RNG tracker keeps "CUDA" generator states: here, the CPU generator's.
    def get_rng_state(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.get_rng_state()

    def set_rng_state(self, state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        torch.set_rng_state(state)

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


class _TorchOnCpu:
    cuda = _CudaOnCpu()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(torch, name)
        if name in ("zeros", "ones", "empty", "full", "tensor", "arange", "randn", "rand"):
            return lambda *args, **kwargs: attr(*args, **_cpu_device(kwargs))
        return attr


def _patch_type_names() -> None:
    """`tensor.type()` called from the optimizer modules answers with the CUDA name of the same
    dtype ("torch.cuda.FloatTensor"); every other caller sees the real name."""
    real = torch.Tensor.type

    def type_(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        name = real(self, *args, **kwargs)
        if (
            args
            or kwargs
            or sys._getframe(1).f_globals.get("__name__") not in TYPE_CHECKING_MODULES
        ):
            return name
        return name.replace("torch.", "torch.cuda.", 1) if self.device.type == "cpu" else name

    torch.Tensor.type = type_


def install() -> None:
    """Idempotent; does nothing where CUDA exists. Called by rlef_hpc.runtime.setup_megatron()
    at the entry points, never implicitly: it patches torch.Tensor.type process-wide."""
    global _installed
    if _installed or torch.cuda.is_available():
        return
    with warnings.catch_warnings():
        # Imported without CUDA, megatron warns that TE and apex are missing, which on a CPU
        # they always are (neither builds without CUDA): noise on every tool's terminal.
        warnings.filterwarnings("ignore", NOT_INSTALLED, UserWarning)
        import megatron.core

        if megatron.core.__version__ not in SUPPORTED:
            raise RuntimeError(
                f"megatron-core {megatron.core.__version__} on CPU: the shims in {__name__} were "
                f"written for {', '.join(SUPPORTED)}; check them against this version first"
            )
        modules = [importlib.import_module(name) for name in PATCHED_MODULES]
    proxy = _TorchOnCpu()
    for module in modules:
        if getattr(module, "torch", None) is torch:
            module.torch = proxy
    _patch_type_names()
    megatron_private.replace_cuda_rng_state_io(
        lambda *args, **kwargs: torch.get_rng_state(),
        lambda state, *args, **kwargs: torch.set_rng_state(state),
    )
    _installed = True


def require_installed() -> None:
    """Raises, naming the fix, where megatron would run on a CPU without the shims (its first
    CUDA call would fail far from the cause)."""
    if not _installed and not torch.cuda.is_available():
        raise RuntimeError(
            "megatron-core on a CPU needs its shims: call rlef_hpc.runtime.setup_megatron() "
            "at the entry point"
        )


def seed(value: int) -> None:
    """Seeds torch and megatron's model-parallel RNG tracker (CPU or CUDA alike)."""
    from megatron.core import tensor_parallel

    require_installed()
    torch.manual_seed(value)
    tensor_parallel.model_parallel_cuda_manual_seed(value)
