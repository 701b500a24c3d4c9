"""What Transformer Engine and CUDA change, checked on the CPU: TE's parameter names through
import, export and refit; the checkpoint's optimizer workaround kept to torch's Adam; FP8
configs as megatron accepts them; the fusions and overlaps each kernel allows; the local
spec's RMSNorm."""

from __future__ import annotations

from types import SimpleNamespace

import torch


class StrictAdam(torch.optim.Optimizer):
    """Stands in for Transformer Engine's FusedAdam: its state_dict and load_state_dict reject
    per-parameter state it does not know (a "step")."""

    KNOWN = {"exp_avg", "exp_avg_sq"}

    def __init__(self, params) -> None:
        super().__init__(params, {"lr": 0.1})

    def _check(self, state: dict) -> None:
        for entry in state.values():
            unknown = set(entry) - self.KNOWN
            if unknown:
                raise KeyError(f"unknown optimizer state {sorted(unknown)}")

    def state_dict(self) -> dict:
        self._check(self.state)
        return super().state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self._check(state_dict["state"])
        super().load_state_dict(state_dict)


def test_resume_workaround_only_touches_torch_adam():
    from rlef_hpc.checkpoint.training import _init_state

    params = [torch.nn.Parameter(torch.ones(3))]
    fused = StrictAdam(params)
    _init_state(SimpleNamespace(optimizer=fused))  # a megatron optimizer around it
    fused.load_state_dict(fused.state_dict())
    adamw = torch.optim.AdamW(params)
    _init_state(SimpleNamespace(optimizer=adamw))
    assert set(adamw.state[params[0]]) == {"step", "exp_avg", "exp_avg_sq"}
