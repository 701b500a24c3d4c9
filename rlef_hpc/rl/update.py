"""The PPO update step over megatron-core models, under any TP x PP x DP layout.

One `PPOUpdate.step(batch)` (the batch being this data-parallel rank's share):
1. the step's micro-batches (rl.batching: rows sorted by length, cut by a token budget, each
   padded only to its own longest row);
2. `prepare`: log-probs of the sampled tokens under the current policy (pi_old) and the frozen
   initial policy (the KL reference), and the value model's V_old at each turn's last prompt
   token (forward-only passes, rl.passes); rewards with the KL penalty, Monte-Carlo returns,
   advantages normalised over the whole batch's turns (statistics all-reduced over
   data-parallel ranks): a typed `ppo.Prepared`;
3. per minibatch, forward/backward of the policy with the clipped, importance-weighted
   surrogate (`policy_loss`), and of the value model with the clipped value loss
   (`value_loss`), micro-batch by micro-batch through megatron's pipeline schedules into
   megatron DDP's gradient buffers, reduced over data-parallel ranks; megatron's optimizer
   clips by the global norm and steps AdamW, its state sharded over data-parallel ranks (the
   distributed optimizer) unless configured otherwise;
4. the metrics, reduced over micro-batches and data-parallel ranks (`reduce_metrics`) and
   handed from the last pipeline stage to every rank (`from_last_stage`).
Only the last pipeline stage sees logits, so the losses and `Prepared` exist there; the
metrics reach every rank (rank 0, on the first stage, logs them). The policy and the reference
compute logits only at the positions that predict response tokens, unless `select_logits` is
off (sequence parallelism forces that: the output layer gathers the sequence itself); the
value model runs each row only to its last value index.
Everything runs on the policy's device: the batch is moved there once per `step`, and every
tensor made here is made there.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy
import torch
import torch.distributed as dist

from rlef_hpc.dist_env import host_group
from rlef_hpc.mismatch import MismatchLimits, mismatch_stats
from rlef_hpc.models.gpt import sequence_multiple
from rlef_hpc.progress import progress_bar
from rlef_hpc.rl import ppo
from rlef_hpc.rl.batching import Part, StepPlan, cut, plan_step
from rlef_hpc.rl.logprobs import next_token_logprobs, vocab_parallel_logprobs
from rlef_hpc.rl.optim import OptimConfig, make_trainable
from rlef_hpc.rl.passes import Passes


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
        *,
        temperature: float = 1.0,
        mismatch: MismatchLimits | None = None,
        micro_batch_tokens: int = 4096,
        select_logits: bool = True,
    ) -> None:
        """`micro_batch_tokens`: rows x padded length per micro-batch (a longer row runs
        alone). `select_logits`: the policy's and the reference's logits only where a loss
        reads them (response tokens: a sixth of the demo's positions); off, or under sequence
        parallelism, at every position."""
        self.reference = reference
        for p in reference.parameters():
            p.requires_grad_(False)
        self.ppo = ppo_config or ppo.PPOConfig()
        self.optim = optim_config or OptimConfig()
        self.trainables = {
            "policy": make_trainable(policy, self.optim),
            "value": make_trainable(value, self.optim),
        }
        self.micro_batch_tokens = micro_batch_tokens
        self.multiple = sequence_multiple(policy.config)
        self.temperature = temperature
        self.device = next(policy.parameters()).device
        self.mismatch = mismatch or MismatchLimits()  # its quantile_limit: what counts
        self.select_logits = select_logits and not policy.config.sequence_parallel
        self.passes = Passes(self.device)

    def plan(self, batch: ppo.PPOBatch, num_minibatches: int = 1) -> StepPlan:
        """The micro-batches of a step on `batch` (on the device), as many per minibatch on
        every data-parallel rank."""
        group = _ps().get_data_parallel_group()
        return plan_step(batch, num_minibatches, self.micro_batch_tokens, self.multiple, group)

    # --- before the update: pi_old, the reference, V_old, advantages ------------------------

    def _logprobs(self, model: torch.nn.Module, batch: ppo.PPOBatch, parts: list[Part]) -> Any:
        """[B, T] log-probs of `batch`'s tokens, put back in the batch's rows and positions
        (zero past each micro-batch's length, where no loss reads); None before the last
        pipeline stage."""
        loss = partial(_logprobs_only, temperature=self.temperature)
        got = self.passes.run(model, parts, loss, forward_only=True)
        if not got:
            return None
        out = torch.zeros(batch.tokens.shape, device=self.device)
        for part, g in zip(parts, got, strict=True):
            out[part.rows, : g["logp"].shape[1]] = g["logp"]
        return out

    def _values(self, batch: ppo.PPOBatch, parts: list[Part]) -> Any:
        """[B, K] V_old at each turn's value index; None before the last pipeline stage."""
        model = self.trainables["value"].model
        got = self.passes.run(model, parts, _values_only, forward_only=True)
        if not got:
            return None
        out = torch.zeros(batch.value_index.shape, device=self.device)
        for part, g in zip(parts, got, strict=True):
            out[part.rows] = g["values"]
        return out

    @torch.no_grad()
    def prepare(self, batch: ppo.PPOBatch, plan: StepPlan) -> ppo.Prepared | None:
        """pi_old, reference log-probs, V_old, returns, advantages and each minibatch's loss
        normalisers, in `plan`'s micro-batches (None before the last pipeline stage)."""
        ps = _ps()
        responses = plan.responses if self.select_logits else None
        policy = cut(batch, plan.prepare["policy"], responses)
        logp_old = self._logprobs(self.trainables["policy"].model, batch, policy)
        logp_ref = self._logprobs(self.reference, batch, policy)
        values_old = self._values(batch, cut(batch, plan.prepare["value"]))
        if not ps.is_pipeline_last_stage():
            return None
        rewards, kl = ppo.rewards_with_kl(batch, logp_old, logp_ref, self.ppo.kl_coef)
        returns = ppo.monte_carlo_returns(rewards, batch.turn_mask)
        dp = ps.get_data_parallel_group()
        adv = ppo.advantages(
            returns, values_old, batch.turn_mask, self.ppo.advantage_normalisation, group=dp
        )
        ev = ppo.explained_variance(returns, values_old, batch.turn_mask, group=dp)
        # Each minibatch's response tokens and turns over all data-parallel ranks (the losses'
        # normalisers), every minibatch's in one all-reduce.
        minibatches = len(plan.minibatches["policy"])
        counts = torch.stack(
            [
                batch.response_mask.reshape(minibatches, -1).sum(1),
                batch.turn_mask.reshape(minibatches, -1).sum(1),
            ],
            1,
        ).double()
        dist.all_reduce(counts, group=dp)
        # A minibatch of nothing but empty rows (trajectories the sandbox failed to judge:
        # ppo.collate) has no tokens to average over: its losses are zero, not 0 / 0.
        counts = counts.clamp(min=1)
        return ppo.Prepared(
            logp_old,
            logp_ref,
            values_old,
            returns,
            adv,
            kl,
            float(numpy.float32(ev)),  # rounded to fp32, as the metrics from the device are
            counts[:, 0],
            counts[:, 1],
        )

    # --- the step ---------------------------------------------------------------------------

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
        plan = self.plan(batch, num_minibatches)
        prepared = self.prepare(batch, plan)
        totals: dict[str, float] = {}
        minibatches = range(num_minibatches)
        if progress:
            minibatches = progress_bar(minibatches, desc="update", unit="minibatch")
        responses = plan.responses if self.select_logits else None
        for m in minibatches:
            parts = {
                "policy": cut(batch, plan.minibatches["policy"][m], responses, prepared, m),
                "value": cut(batch, plan.minibatches["value"][m], None, prepared, m),
            }
            for key, value in self._update(parts).items():
                totals[key] = totals.get(key, 0.0) + value / num_minibatches
        totals["padding_fraction"] = plan.padding_fraction()  # this rank's
        if prepared is not None:
            dp = ps.get_data_parallel_group()
            totals["explained_variance"] = prepared.explained_variance
            kl = torch.stack([prepared.kl.sum(), batch.turn_mask.sum().float()]).double()
            dist.all_reduce(kl, group=dp)
            totals["kl"] = float(kl[0] / kl[1])  # mean per-turn KL estimate over the batch
            # pi_old against the engine's sampling log-probs, once over the whole batch (all
            # data-parallel ranks): what the per-batch guard checks (rlef_hpc.mismatch).
            totals.update(
                mismatch_stats(
                    prepared.logp_old,
                    batch.logp_behaviour,
                    batch.response_mask,
                    self.mismatch.quantile_limit,
                    group=dp,
                )
            )
        return from_last_stage(totals)

    def _update(self, parts: dict[str, list[Part]]) -> dict[str, float]:
        """One optimizer step of the policy and one of the value model on a minibatch's
        `parts` of each (with their targets on the last stage)."""
        ps = _ps()
        # The losses are means over the whole minibatch already (divided by its counts, not
        # by a micro-batch's), but the schedule divides by the number of micro-batches and
        # DDP averages gradients over data-parallel ranks: undo both.
        dp = ps.get_data_parallel_world_size()
        losses = {
            "policy": partial(
                policy_loss,
                config=self.ppo,
                temperature=self.temperature,
                scale=len(parts["policy"]) * dp,
            ),
            "value": partial(value_loss, config=self.ppo, scale=len(parts["value"]) * dp),
        }
        metrics: dict[str, float] = {}
        for name in ("policy", "value"):
            trainable = self.trainables[name]
            trainable.model.zero_grad_buffer()
            trainable.optimizer.zero_grad()
            got = self.passes.run(trainable.model, parts[name], losses[name], forward_only=False)
            trainable.finish_grads()
            _, norm, _ = trainable.step()
            trainable.scheduler.step(1)
            metrics[f"{name}_grad_norm"] = float(norm)
            if ps.is_pipeline_last_stage():
                metrics.update(reduce_metrics(got, ps.get_data_parallel_group()))
        return metrics


# --- losses: loss(part, model output) -> (loss, metrics), as rl.passes runs them -------------


def part_logprobs(
    logits: torch.Tensor, part: Part, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits on `part` -> (logp, entropy) [b, s] of its tokens: position 0 zero,
    and with the logits selected (part.response), every position outside the responses zero
    too (no loss reads them)."""
    tokens = part.batch.tokens
    if part.response is None:
        return next_token_logprobs(logits, tokens, temperature)
    r = part.response
    rows, k = r.positions.shape
    logp, entropy = vocab_parallel_logprobs(
        logits.reshape(rows, k, logits.shape[-1]), tokens.gather(1, r.positions), temperature
    )
    zeros = torch.zeros(tokens.shape, dtype=logp.dtype, device=logp.device)
    valid = r.valid.to(logp.dtype)
    return zeros.scatter(1, r.positions, logp * valid), zeros.scatter(
        1, r.positions, entropy * valid
    )


def _logprobs_only(part: Part, logits: torch.Tensor, temperature: float) -> Any:
    logp, _ = part_logprobs(logits.detach(), part, temperature)
    return logp.new_zeros(()), {"logp": logp}


def _values_only(part: Part, values: torch.Tensor) -> Any:
    v = values.detach().squeeze(-1).float().gather(1, part.batch.value_index)
    return v.new_zeros(()), {"values": v}


def policy_loss(
    part: Part, logits: torch.Tensor, config: ppo.PPOConfig, temperature: float, scale: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate on `part` against its targets, times `scale`; its metrics
    (clip fraction, approximate KL, IS weight, entropy, the loss) unscaled."""
    t, chunk = part.targets, part.batch
    logp, entropy = part_logprobs(logits, part, temperature)
    loss, metrics = ppo.policy_loss(
        logp,
        t.logp_old,
        chunk.logp_behaviour,
        ppo.token_advantages(t.adv, chunk),
        chunk.response_mask,
        config,
        t.num_tokens,
    )
    metrics["entropy"] = (entropy.detach() * chunk.response_mask).sum() / t.num_tokens
    metrics["policy_loss"] = loss.detach()
    return loss * scale, metrics


def value_loss(
    part: Part, values: torch.Tensor, config: ppo.PPOConfig, scale: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped value loss on `part` against its targets, times `scale`."""
    t, chunk = part.targets, part.batch
    v = values.squeeze(-1).float().gather(1, chunk.value_index)
    loss = ppo.value_loss(v, t.values_old, t.returns, chunk.turn_mask, config, t.num_turns)
    return loss * scale, {"value_loss": loss.detach()}


# --- metrics ----------------------------------------------------------------------------------


def reduce_metrics(reported: list[dict[str, torch.Tensor]], group: Any) -> dict[str, float]:
    """One update's metrics from what its losses reported per micro-batch: `*_max` the
    maximum, the rest sums over micro-batches and data-parallel ranks (`group`; each already
    divided by the whole minibatch's count)."""
    if not reported:
        return {}
    out: dict[str, float] = {}
    for op, keys in (
        (dist.ReduceOp.SUM, [k for k in reported[0] if not k.endswith("_max")]),
        (dist.ReduceOp.MAX, [k for k in reported[0] if k.endswith("_max")]),
    ):
        if not keys:
            continue
        combine = sum if op == dist.ReduceOp.SUM else max
        values = torch.stack([combine(p[k] for p in reported) for k in keys]).double()
        dist.all_reduce(values, op=op, group=group)
        out.update(zip(keys, values.tolist(), strict=True))
    return out


def from_last_stage(metrics: dict[str, float]) -> dict[str, float]:
    """Every rank's metrics with its pipeline's last stage's: losses, KL, entropy and the
    mismatch exist only there, but rank 0 (a first stage) logs them and every rank's refit
    guard reads mismatch_max. Over the host group: a few floats, once per step."""
    ps = _ps()
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return metrics
    group = host_group()
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, metrics, group=group)
    last = dist.get_group_rank(group, ps.get_pipeline_model_parallel_last_rank())
    return {**metrics, **gathered[last]}
