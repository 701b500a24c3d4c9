"""Every use rlef_hpc makes of megatron-core's private members, in one place. Read against
megatron-core 0.16.1 (the release pyproject.toml pins): each function names the member and the
megatron source it was read in. A new megatron release is checked here first; `require()`
refuses any other version rather than let a renamed member fail half-way through a save.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

import torch

READ_AGAINST = "0.16.1"


@cache
def require() -> None:
    import megatron.core

    if megatron.core.__version__ != READ_AGAINST:
        raise RuntimeError(
            f"megatron-core {megatron.core.__version__}: {__name__} uses private members of "
            f"megatron-core {READ_AGAINST}; check them against this version first"
        )


def install_writer_results_queue(make: Callable[[], Any]) -> None:
    """Gives megatron's checkpoint writers the queue they report through, made by `make()`,
    unless they have one. dist_checkpointing/strategies/filesystem_async.py keeps it in the
    module global `_results_queue`, which `_get_write_results_queue` fills at the first save
    with a Manager queue of its own (one that would outlive a killed caller)."""
    require()
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = make()


def optimizer_param_state(optimizer: Any, param: torch.nn.Parameter) -> dict[str, torch.Tensor]:
    """The distributed optimizer's state of `param` as this rank holds it (its DP shard of the
    fp32 main parameter and of each Adam moment, by name; torch Adam's "step" too):
    DistributedOptimizer._get_main_param_and_optimizer_states (optimizer/distrib_optimizer.py),
    what its own dp_reshardable loader reads."""
    require()
    return optimizer._get_main_param_and_optimizer_states(param)


def set_optimizer_param_state(
    optimizer: Any, param: torch.nn.Parameter, state: dict[str, torch.Tensor]
) -> None:
    """Copies `state` (this rank's shard, as optimizer_param_state gives it) into the
    distributed optimizer: DistributedOptimizer._set_main_param_and_optimizer_states, what its
    own dp_reshardable loader writes through (it copies into the optimizer's device)."""
    require()
    optimizer._set_main_param_and_optimizer_states(param, state)


def replace_cuda_rng_state_io(get: Callable[..., torch.Tensor], set_: Callable[..., None]) -> None:
    """Replaces tensor_parallel/random.py's module functions `_get_cuda_rng_state` and
    `_set_cuda_rng_state`, through which the model-parallel RNG tracker reads and restores
    generator states (on CPU: the CPU generator's; rlef_hpc.models.megatron_compat)."""
    require()
    from megatron.core.tensor_parallel import random

    random._get_cuda_rng_state = get
    random._set_cuda_rng_state = set_
