"""What the colocated layouts owe a GPU, checked on the CPU: the asynchronous mode's rollout
thread generates on the rank's CUDA device (a new thread's is device 0), and the refit probe,
which runs outside megatron's schedules, makes Transformer Engine cast the weights afresh as a
schedule's first micro-batch does (else under FP8 it checks the engine against the casts made
before the optimizer step)."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch
from megatron.core.transformer.module import MegatronModule

from rlef_hpc import dist_env
from rlef_hpc.mismatch import MismatchLimits
from rlef_hpc.rl.logprobs import naive_token_logprobs
from rlef_hpc.rollout.lockstep import EngineGroup
from rlef_hpc.train import sources


@pytest.mark.parametrize("device", [torch.device("cuda", 3), torch.device("cpu")])
def test_async_colocated_generates_on_the_ranks_cuda_device(monkeypatch, device):
    """torch.cuda.set_device stands in for CUDA (none here): the rollout thread sets the
    rank's device once, before its first generation; on a CPU it sets none."""
    calls: list[tuple[str, object]] = []
    monkeypatch.setattr(
        torch.cuda, "set_device", lambda d: calls.append((threading.current_thread().name, d))
    )
    monkeypatch.setattr(dist_env, "_device", device)

    def colocated_init(self, *args, **kwargs):
        self.cfg = SimpleNamespace(run=SimpleNamespace(iterations=3))

    monkeypatch.setattr(sources.Colocated, "__init__", colocated_init)
    source = sources.AsyncColocated()

    def generate(iteration: int, progress: bool = True):
        calls.append((threading.current_thread().name, f"generate {iteration}"))
        return [], {}

    source.generate = generate
    try:
        for iteration in (1, 2, 3):
            source.batch(iteration)
    finally:
        source.close()
    background = [c for c in calls if c[0] != threading.current_thread().name]
    expected = [f"generate {i}" for i in (2, 3)]
    if device.type == "cuda":
        expected.insert(0, device)
    assert [what for _, what in background] == expected
    assert len({thread for thread, _ in background}) == 1


class TEWrapped(torch.nn.Module):
    """Megatron's TE linear wrapper as it treats the flag (core/extensions/transformer_engine.py
    TELinear.forward): TE is handed is_first_microbatch (and re-casts its FP8 weights only when
    it is True), then the wrapper sets it False."""

    def __init__(self) -> None:
        super().__init__()
        self.is_first_microbatch = True
        self.recast: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.recast.append(self.is_first_microbatch)
        self.is_first_microbatch = False
        return x


class Policy(MegatronModule):
    def __init__(self) -> None:
        super().__init__(SimpleNamespace(fp8="e4m3", fp4=None))
        self.linear = TEWrapped()
        self.table = torch.nn.Parameter(
            torch.randn(16, 16, generator=torch.Generator().manual_seed(0))
        )

    def forward(self, tokens, positions, mask):
        return self.linear(self.table[tokens])


def plain_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, None]:
    """next_token_logprobs without megatron's tensor-parallel group (one process, no vocab
    shards): log p(token | before), position 0 zero."""
    logp = naive_token_logprobs(logits[:, :-1], tokens[:, 1:])[0]
    return torch.cat([torch.zeros(len(logp), 1), logp], 1), None


def test_the_refit_probe_recasts_fp8_weights_as_a_schedules_first_microbatch(monkeypatch):
    monkeypatch.setattr(sources, "next_token_logprobs", plain_logprobs)
    policy = Policy()
    # A schedule's micro-batches (megatron's forward_step sets the flag for the first), then
    # the optimizer step; the probe comes after it.
    policy.set_is_first_microbatch()
    for _ in range(3):
        policy(torch.zeros(1, 4, dtype=torch.long), None, None)
    with torch.no_grad():
        policy.table.add_(1.0)
    probe = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8], [8, 7, 6, 5, 4, 3, 2, 1]])

    class Engine:  # the refit made it equal to the trainer's post-step weights
        def sequence_logprobs(self, sequences):
            x = torch.tensor(sequences)
            return plain_logprobs(policy.table.detach()[x].float(), x)[0].tolist()

    source = sources.Colocated.__new__(sources.Colocated)
    source.policy, source.probe, source.engine = policy, probe, Engine()
    source.engines = EngineGroup(source.engine, None)  # one process: its own engine group
    source.cfg = SimpleNamespace(
        rollout=SimpleNamespace(refit_mismatch=MismatchLimits()),
        precision=SimpleNamespace(dtype="bfloat16"),
    )
    stats = source.check_refit(1.0)
    assert policy.linear.recast == [True, False, False, True]
    assert stats["refit_mismatch_max"] < 1e-5
