"""Where the trainer's tensors live, checked on CPU (run by test_device_placement, one part per
process: `python tests/scripts/device_placement.py PART`).

On a GPU, a model refuses inputs on the CPU and NCCL refuses CPU tensors; on CPU both are the
CPU, so a tensor made without `device=` goes unnoticed. Here it cannot: the parts run with
"meta" as the default device of this project's code while the models and their inputs are
explicitly on the CPU, so a tensor made without a device is on "meta" and mixing it with the
model's fails.
Every model's forward checks its inputs' device, and every collective checks its tensors'
device against its group's: the host group (dist_env.host_group(), gloo) takes CPU tensors and
objects; the model's groups take the model's device; the default group, NCCL on GPUs, takes
nothing from this project's code (this test cannot make the CUDA tensors it would need)."""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

from rlef_hpc import dist_env
from rlef_hpc.models import megatron_compat
from rlef_hpc.models.config import PrecisionConfig
from rlef_hpc.models.gpt import build_gpt

TENSOR_COLLECTIVES = (
    "all_reduce",
    "broadcast",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "send",
    "recv",
)
OBJECT_COLLECTIVES = ("all_gather_object", "broadcast_object_list", "gather_object")


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _tensors(v)


def _checked(name: str, real: Any, model_device: torch.device, host: Any) -> Any:
    signature = inspect.signature(real)

    def collective(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        group = bound.arguments.get("group")
        default = group is None or group is dist.group.WORLD
        caller = sys._getframe(1).f_globals["__name__"]
        if default and caller.startswith(("megatron.", "torch.distributed.checkpoint.")):
            # megatron's and torch's checkpointing's own object collectives over the default
            # group (building optimizer groups, save plans) are upstream's, made for NCCL;
            # only ours are judged here.
            return real(*args, **kwargs)
        if default:
            raise AssertionError(
                f"{name} over the default group (NCCL on GPUs): host-side values go over "
                "dist_env.host_group(), the model's over its megatron group"
            )
        expected = torch.device("cpu") if group is host else model_device
        for value in bound.arguments.values():
            for t in _tensors(value):
                assert t.device == expected, f"{name}: a {t.device} tensor over a {expected} group"
        if name in OBJECT_COLLECTIVES:
            assert group is host, f"{name} outside the host group"
        return real(*args, **kwargs)

    return collective


def _check_inputs(model: torch.nn.Module, device: torch.device) -> None:
    def hook(module: Any, args: tuple, kwargs: dict) -> None:
        for t in _tensors(list(args) + list(kwargs.values())):
            assert t.device == device, f"model input on {t.device}, the model on {device}"

    model.register_forward_pre_hook(hook, with_kwargs=True)


def _called_from_project() -> bool:
    """Whether the torch call being intercepted was made by rlef_hpc's code (the CPU shim of
    megatron, which makes megatron's tensors, is megatron's side)."""
    frame = sys._getframe(1)
    while frame is not None and (
        frame.f_globals.get("__name__", "").startswith(("torch", megatron_compat.__name__))
        or frame.f_code in _OWN_CODE
    ):
        frame = frame.f_back
    return frame is not None and frame.f_globals.get("__name__", "").startswith("rlef_hpc.")


class ProjectDefaultsToMeta(TorchFunctionMode):
    """torch.set_default_device("meta"), for rlef_hpc's calls only: megatron's own CPU-side
    temporaries (its grad norm without apex, made for CUDA hosts too) are not judged here."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None):
        kwargs = kwargs or {}
        if func in _device_constructors() and kwargs.get("device") is None:
            if _called_from_project():
                kwargs["device"] = "meta"
        return func(*args, **kwargs)


_OWN_CODE = {ProjectDefaultsToMeta.__torch_function__.__code__, _called_from_project.__code__}


@contextmanager
def strict_devices(model_device: torch.device) -> Iterator[None]:
    """Tensors the project makes without a device land on "meta"; collectives check their
    devices."""
    host = dist_env.host_group()
    saved = {n: getattr(dist, n) for n in TENSOR_COLLECTIVES + OBJECT_COLLECTIVES}
    for name, real in saved.items():
        setattr(dist, name, _checked(name, real, model_device, host))
    try:
        with ProjectDefaultsToMeta():
            yield
    finally:
        for name, real in saved.items():
            setattr(dist, name, real)


def models() -> tuple[Any, Any, Any]:
    from tests.scripts.ppo_update import MODEL

    megatron_compat.seed(1234)
    built = (
        build_gpt(MODEL, PrecisionConfig()),
        build_gpt(MODEL, PrecisionConfig(), value=True),
        build_gpt(MODEL, PrecisionConfig()),
    )
    for model in built:
        _check_inputs(model, torch.device("cpu"))
    return built


def ppo_update() -> None:
    from rlef_hpc.rl.optim import OptimConfig
    from rlef_hpc.rl.update import PPOUpdate
    from tests.scripts.ppo_update import fixed_batch

    policy, value, reference = models()
    update = PPOUpdate(policy, value, reference, optim_config=OptimConfig(warmup_steps=1))
    batch = fixed_batch()
    with strict_devices(torch.device("cpu")):
        metrics = update.step(batch, num_minibatches=2)
    assert {"policy_loss", "value_loss", "kl", "entropy", "mismatch_max"} <= metrics.keys()


def warm_start() -> None:
    from rlef_hpc.train.warmstart import warm_start
    from tests.scripts.warmstart_update import examples

    policy, _, _ = models()
    data = examples()
    with strict_devices(torch.device("cpu")):
        losses = warm_start(policy, data, steps=2, batch_size=4, lr=1e-3, seed=0).losses
    assert len(losses) == 2


def refit_probe() -> None:
    """Colocated.refit's trainer side, against an engine that answers the trainer's own
    log-probs (computed before the strict part, the naive way)."""
    from rlef_hpc.mismatch import MismatchLimits
    from rlef_hpc.rl.logprobs import naive_token_logprobs
    from rlef_hpc.rollout.lockstep import EngineGroup
    from rlef_hpc.train.sources import Colocated
    from tests.scripts.ppo_update import MODEL

    policy, _, _ = models()
    probe = torch.randint(0, MODEL.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mask = torch.triu(torch.ones(1, 1, 9, 9, dtype=torch.bool), 1)
        logits = policy(probe, torch.arange(9).expand(2, -1), mask)
    expected = naive_token_logprobs(logits[:, :-1], probe[:, 1:])[0]
    engine = SimpleNamespace(
        update_weights=lambda weights: sum(1 for _ in weights),
        sequence_logprobs=lambda seqs: [[0.0] + row for row in expected.tolist()],
    )
    source = Colocated.__new__(Colocated)  # its engine is the stand-in above
    source.policy, source.model_cfg, source.probe, source.engine = policy, MODEL, probe, engine
    source.engines = EngineGroup(engine, None)  # one process: its own engine group
    limits = MismatchLimits(mean_limit=1e-4, quantile=1.0, quantile_limit=1e-4)
    source.cfg = SimpleNamespace(
        rollout=SimpleNamespace(refit_mismatch=limits), precision=SimpleNamespace(dtype="float32")
    )
    with strict_devices(torch.device("cpu")):
        stats = source.refit()
    assert stats["refit_mismatch_max"] < 1e-4


def loop_reductions() -> None:
    """The loop's host-side collectives: episode metrics, the stop flag, shard claims and
    evaluation trajectories."""
    from rlef_hpc.train import sources
    from rlef_hpc.train.evaluation import TrainerEvaluation
    from rlef_hpc.train.preemption import StopFlag

    with strict_devices(torch.device("cpu")):
        mean = dist_env.mean_over_ranks({"a": 1.0, "b": 3.0})
        flag = StopFlag(announce=False).everywhere()
    assert mean == {"a": 1.0, "b": 3.0} and flag is False

    claimed = [(0, ["t0", "t1"])]
    source = sources.Disaggregated.__new__(sources.Disaggregated)
    source.rank, source.dp_rank, source.dp = 0, 0, 1
    source.shards = SimpleNamespace(claim=lambda *args, **kwargs: claimed)
    source.cfg = SimpleNamespace(
        rollout=SimpleNamespace(
            rollouts_per_iteration=2, shard_rollouts=2, max_staleness=1, shard_timeout_s=1.0
        )
    )
    sources.load_shards = lambda shards: shards
    # The evaluation's generate: this rank's share of a draw, gathered over the ranks.
    evaluation = TrainerEvaluation.__new__(TrainerEvaluation)
    evaluation.episode_config = None
    evaluation.engines = SimpleNamespace(
        run_episodes=lambda mine, *args, **kwargs: mine, dp_rank=0, dp=1
    )
    with strict_devices(torch.device("cpu")):
        trajectories, _ = source.batch(1)
        drawn = evaluation._generate(["p", "q"], 0.2, 0.95, "eval-1-valid")
    assert trajectories == ["t0", "t1"] and drawn == ["p", "q"]


def checkpoint() -> None:
    """A training checkpoint saved and loaded back (its layout and path decisions are
    host-side collectives), after one update made the optimizer state."""
    import tempfile

    from rlef_hpc.checkpoint import training
    from rlef_hpc.rl.optim import OptimConfig
    from rlef_hpc.rl.update import PPOUpdate
    from tests.scripts.ppo_update import fixed_batch

    policy, value, reference = models()
    update = PPOUpdate(policy, value, reference, optim_config=OptimConfig(warmup_steps=1))
    update.step(fixed_batch(), num_minibatches=2)
    saved = [(n, t.module, t.optimizer) for n, t in update.trainables.items()]
    schedulers = {n: t.scheduler for n, t in update.trainables.items()}
    with tempfile.TemporaryDirectory() as run_dir, strict_devices(torch.device("cpu")):
        path = training.save(run_dir, 1, saved, schedulers, {"iteration": 1})
        report: dict = {}
        state = training.load(path, saved, schedulers, report=report)
    assert state["iteration"] == 1 and set(report.values()) == {"parallel"}, report


def value_head() -> None:
    """The value model's head is made where its trunk is (issue 32.3: it was made on the CPU
    whatever the device, and reached a GPU only through the distributed optimizer's buffer)."""
    from tests.scripts.ppo_update import MODEL

    megatron_compat.seed(1234)
    with strict_devices(torch.device("cpu")):
        value = build_gpt(MODEL, PrecisionConfig(), value=True)
    devices = {name: p.device for name, p in value.named_parameters()}
    assert set(devices.values()) == {torch.device("cpu")}, devices


PARTS = {
    f.__name__: f
    for f in (ppo_update, warm_start, refit_probe, loop_reductions, checkpoint, value_head)
}


def main() -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29541")
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo")
    # As under NCCL: the host group is a gloo group of its own, not the default group.
    dist_env._host_group = dist.new_group(backend="gloo")
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(1, 1)
    PARTS[sys.argv[1]]()
    print("ok", sys.argv[1])


if __name__ == "__main__":
    from rlef_hpc import runtime

    runtime.setup()
    runtime.setup_megatron()
    main()
