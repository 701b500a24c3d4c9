"""The PPO update step over megatron-core models, under any TP x PP x DP layout.

One `PPOUpdate.step(batch)` (the batch being this data-parallel rank's share):
1. log-probs of the sampled tokens under the current policy (pi_old) and the frozen initial
   policy (the KL reference), and the value model's V_old at each turn's last prompt token:
   forward-only passes;
2. rewards with the KL penalty, Monte-Carlo returns, advantages normalised over the whole
   batch's turns (statistics all-reduced over data-parallel ranks);
3. forward/backward of the policy with the clipped, importance-weighted surrogate, and of the
   value model with the clipped value loss, micro-batch by micro-batch through megatron's
   pipeline schedules into megatron DDP's gradient buffers, reduced over data-parallel ranks;
   megatron's optimizer clips by the global norm and steps AdamW, its state sharded over
   data-parallel ranks (the distributed optimizer) unless configured otherwise.
Only the last pipeline stage sees logits, so steps 1-2 and the losses happen there; the
metrics reach every rank (rank 0, on the first stage, logs them).
Everything runs on the policy's device: the batch is moved there once per `step`, and every
tensor made here is made there.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from rlef_hpc.dist_env import host_group
from rlef_hpc.mismatch import MismatchLimits, mismatch_stats
from rlef_hpc.models.gpt import causal_mask
from rlef_hpc.progress import progress_bar
from rlef_hpc.rl import ppo
from rlef_hpc.rl.logprobs import next_token_logprobs
from rlef_hpc.rl.optim import OptimConfig, make_trainable


def _ps() -> Any:  # megatron's import is heavy: deferred to first use
    from megatron.core import parallel_state

    return parallel_state


class PPOUpdate:
    def __init__(
        self,
        policy: torch.nn.Module,
        value: torch.nn.Module,
        reference: torch.nn.Module,
        ppo_config: ppo.PPOConfig | None = None,
        optim_config: OptimConfig | None = None,
        micro_batch_size: int = 1,
        temperature: float = 1.0,
        mismatch: MismatchLimits | None = None,
    ) -> None:
        self.reference = reference
        for p in reference.parameters():
            p.requires_grad_(False)
        self.ppo = ppo_config or ppo.PPOConfig()
        self.optim = optim_config or OptimConfig()
        self.trainables = {
            "policy": make_trainable(policy, self.optim),
            "value": make_trainable(value, self.optim),
        }
        self.mbs = micro_batch_size
        self.temperature = temperature
        self.device = next(policy.parameters()).device
        self.mismatch = mismatch or MismatchLimits()  # its quantile_limit: what counts

    # --- passes -----------------------------------------------------------------------------

    def _run(
        self, model: torch.nn.Module, batch: ppo.PPOBatch, loss: Callable, forward_only: bool
    ) -> list:
        """Micro-batches of `batch` through `model`; returns what `loss` reported per micro-batch
        (on the last pipeline stage; nothing elsewhere)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        b, seq = batch.tokens.shape
        if b % self.mbs:
            raise ValueError(
                f"batch of {b} sequences is not a multiple of micro_batch_size={self.mbs}"
            )
        n = b // self.mbs
        chunks = iter(
            [(i, batch.select(slice(i * self.mbs, (i + 1) * self.mbs))) for i in range(n)]
        )
        positions = torch.arange(seq, device=self.device).expand(self.mbs, seq)
        mask = causal_mask(seq, self.device)

        def forward_step(data: Any, model: torch.nn.Module) -> Any:
            i, chunk = next(data)
            return model(chunk.tokens, positions, mask), partial(loss, i, chunk, n)

        out = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=chunks,
            model=[model],
            num_microbatches=n,
            seq_length=seq,
            micro_batch_size=self.mbs,
            forward_only=forward_only,
        )
        return [o for o in out if o] if isinstance(out, list) else []

    def _token_logprobs(
        self, logits: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [b, s, vocab shard] -> (logp, entropy) [b, s], position 0 zero."""
        return next_token_logprobs(logits, tokens, self.temperature)

    def _collect_logprobs(self, model: torch.nn.Module, batch: ppo.PPOBatch) -> torch.Tensor | None:
        def loss(i, chunk, n, logits):
            logp, _ = self._token_logprobs(logits.detach(), chunk.tokens)
            return logp.new_zeros(()), {"logp": logp}

        parts = self._run(model, batch, loss, forward_only=True)
        return torch.cat([p["logp"] for p in parts]) if parts else None

    def _collect_values(self, batch: ppo.PPOBatch) -> torch.Tensor | None:
        def loss(i, chunk, n, values):
            v = values.detach().squeeze(-1).float().gather(1, chunk.value_index)
            return v.new_zeros(()), {"values": v}

        parts = self._run(self.trainables["value"].model, batch, loss, forward_only=True)
        return torch.cat([p["values"] for p in parts]) if parts else None

    # --- the update -------------------------------------------------------------------------

    @torch.no_grad()
    def prepare(self, batch: ppo.PPOBatch) -> dict[str, torch.Tensor] | None:
        """pi_old, reference log-probs, V_old, returns, advantages (last stage only)."""
        ps = _ps()
        logp_old = self._collect_logprobs(self.trainables["policy"].model, batch)
        logp_ref = self._collect_logprobs(self.reference, batch)
        values_old = self._collect_values(batch)
        if not ps.is_pipeline_last_stage():
            return None
        rewards, kl = ppo.rewards_with_kl(batch, logp_old, logp_ref, self.ppo.kl_coef)
        returns = ppo.monte_carlo_returns(rewards, batch.turn_mask)
        dp = ps.get_data_parallel_group()
        mode = self.ppo.advantage_normalisation
        return {
            "logp_old": logp_old,
            "logp_ref": logp_ref,
            "values_old": values_old,
            "returns": returns,
            "adv": ppo.advantages(returns, values_old, batch.turn_mask, mode, group=dp),
            "kl": kl,
            "explained_variance": torch.tensor(
                ppo.explained_variance(returns, values_old, batch.turn_mask, group=dp),
                device=self.device,
            ),
        }

    def step(
        self, batch: ppo.PPOBatch, num_minibatches: int = 1, progress: bool = False
    ) -> dict[str, float]:
        """Prepare once (pi_old, reference, V_old, advantages over the whole batch), then one
        optimizer step per minibatch (RLEF: 1024 rollouts, 4 updates of 256). `batch` is this
        data-parallel rank's share: the m-th minibatch of every rank together is the m-th
        minibatch of the whole batch. Metrics are averaged over the minibatches, but for the
        trainer-vs-engine mismatch_*, taken once over the whole batch."""
        ps = _ps()
        batch = batch.to(self.device)
        prep = self.prepare(batch)
        b = batch.tokens.shape[0]
        if b % num_minibatches or (b // num_minibatches) % self.mbs:
            raise ValueError(
                f"{b} sequences do not split into {num_minibatches} minibatches of whole "
                f"micro-batches of {self.mbs}"
            )
        size = b // num_minibatches
        totals: dict[str, float] = {}
        minibatches = range(num_minibatches)
        if progress:
            minibatches = progress_bar(minibatches, desc="update", unit="minibatch")
        for m in minibatches:
            rows = slice(m * size, (m + 1) * size)
            sub = batch.select(rows)
            sub_prep = None
            if prep is not None:
                sub_prep = {k: v[rows] if v.dim() else v for k, v in prep.items()}
                counts = torch.stack([sub.response_mask.sum(), sub.turn_mask.sum()]).double()
                dist.all_reduce(counts, group=ps.get_data_parallel_group())
                sub_prep["num_tokens"], sub_prep["num_turns"] = counts[0], counts[1]
            for key, value in self._update(sub, sub_prep).items():
                totals[key] = totals.get(key, 0.0) + value / num_minibatches
        if prep is not None:
            totals["explained_variance"] = float(prep["explained_variance"])
            kl = torch.stack([prep["kl"].sum(), batch.turn_mask.sum().float()]).double()
            dist.all_reduce(kl, group=ps.get_data_parallel_group())
            totals["kl"] = float(kl[0] / kl[1])  # mean per-turn KL estimate over the batch
            # pi_old against the engine's sampling log-probs, once over the whole batch (all
            # data-parallel ranks): what the per-batch guard checks (rlef_hpc.mismatch).
            totals.update(
                mismatch_stats(
                    prep["logp_old"],
                    batch.logp_behaviour,
                    batch.response_mask,
                    self.mismatch.quantile_limit,
                    group=ps.get_data_parallel_group(),
                )
            )
        return self._from_last_stage(totals)

    def _from_last_stage(self, metrics: dict[str, float]) -> dict[str, float]:
        """Every rank's metrics with its pipeline's last stage's: losses, KL, entropy and the
        mismatch exist only there, but rank 0 (a first stage) logs them and every rank's
        refit guard reads mismatch_max. Over the host group: a few floats, once per step."""
        ps = _ps()
        if ps.get_pipeline_model_parallel_world_size() == 1:
            return metrics
        group = host_group()
        gathered: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, metrics, group=group)
        last = dist.get_group_rank(group, ps.get_pipeline_model_parallel_last_rank())
        return {**metrics, **gathered[last]}

    def _update(
        self, batch: ppo.PPOBatch, prep: dict[str, torch.Tensor] | None
    ) -> dict[str, float]:
        ps = _ps()
        rows = lambda i, t: t[i * self.mbs : (i + 1) * self.mbs]  # noqa: E731
        # The losses are means over the whole batch already, but the schedule divides by the
        # number of micro-batches and DDP averages gradients over data-parallel ranks: undo both.
        scale = (batch.tokens.shape[0] // self.mbs) * ps.get_data_parallel_world_size()

        def policy_loss(i, chunk, n, logits):
            logp, entropy = self._token_logprobs(logits, chunk.tokens)
            token_adv = ppo.token_advantages(rows(i, prep["adv"]), chunk)
            loss, metrics = ppo.policy_loss(
                logp,
                rows(i, prep["logp_old"]),
                chunk.logp_behaviour,
                token_adv,
                chunk.response_mask,
                self.ppo,
                prep["num_tokens"],
            )
            mask = chunk.response_mask
            metrics["entropy"] = (entropy.detach() * mask).sum() / prep["num_tokens"]
            metrics["policy_loss"] = loss.detach()
            return loss * scale, metrics

        def value_loss(i, chunk, n, values):
            v = values.squeeze(-1).float().gather(1, chunk.value_index)
            loss = ppo.value_loss(
                v,
                rows(i, prep["values_old"]),
                rows(i, prep["returns"]),
                chunk.turn_mask,
                self.ppo,
                prep["num_turns"],
            )
            return loss * scale, {"value_loss": loss.detach()}

        metrics: dict[str, float] = {}
        for name, loss_fn in (("policy", policy_loss), ("value", value_loss)):
            trainable = self.trainables[name]
            trainable.model.zero_grad_buffer()
            trainable.optimizer.zero_grad()
            parts = self._run(trainable.model, batch, loss_fn, forward_only=False)
            trainable.finish_grads()
            _, norm, _ = trainable.step()
            trainable.scheduler.step(1)
            metrics[f"{name}_grad_norm"] = float(norm)
            metrics.update(self._reduce(parts, ps))
        return metrics

    def _reduce(self, parts: list[dict[str, torch.Tensor]], ps: Any) -> dict[str, float]:
        """Per-update metrics, by the keys the loss reported: `*_max` the maximum, the rest
        sums over micro-batches and data-parallel ranks (each already divided by the whole
        batch's count). Known on the last pipeline stage only (other stages report grad
        norms)."""
        if not (ps.is_pipeline_last_stage() and parts):
            return {}
        group = ps.get_data_parallel_group()
        out: dict[str, float] = {}
        for op, keys in (
            (dist.ReduceOp.SUM, [k for k in parts[0] if not k.endswith("_max")]),
            (dist.ReduceOp.MAX, [k for k in parts[0] if k.endswith("_max")]),
        ):
            if not keys:
                continue
            combine = sum if op == dist.ReduceOp.SUM else max
            values = torch.stack([combine(p[k] for p in parts) for k in keys]).double()
            dist.all_reduce(values, op=op, group=group)
            out.update(zip(keys, values.tolist(), strict=True))
        return out
