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
Micro-batches (rlef_hpc.rl.batching): by default rows sorted by length and cut by a token
budget, each padded only to its own longest row (`batching="bucketed"`); `"padded"` is the
original fixed-size micro-batches at the batch's length, kept for comparison. Plans are made
once per step from the rows' lengths (one device sync), and the causal mask and positions are
views of tensors made once per longest length. Under pipeline parallelism micro-batches differ
in shape, which the p2p exchange learns from the config's `variable_seq_lengths`
(models/gpt.transformer_config). On the bucketed path the policy and the reference also
compute logits only at the positions that predict response tokens (a pre-hook on their
output layers), and the value model runs each row only to its last value index.
Everything runs on the policy's device: the batch is moved there once per `step`, and every
tensor made here is made there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from rlef_hpc.dist_env import host_group
from rlef_hpc.mismatch import MismatchLimits, mismatch_stats
from rlef_hpc.models.gpt import causal_mask, sequence_multiple
from rlef_hpc.progress import progress_bar
from rlef_hpc.rl import ppo
from rlef_hpc.rl.batching import (
    Batching,
    MicroBatch,
    bucketed_plan,
    padded_plan,
    padding_fraction,
    split_to,
)
from rlef_hpc.rl.logprobs import next_token_logprobs, vocab_parallel_logprobs
from rlef_hpc.rl.optim import OptimConfig, make_trainable


def _ps() -> Any:  # megatron's import is heavy: deferred to first use
    from megatron.core import parallel_state

    return parallel_state


@dataclass
class _Part:
    """One micro-batch: its rows of the batch cut to its length, and (on the last stage, in
    the update) the same rows of what `prepare` computed."""

    batch: ppo.PPOBatch
    rows: torch.Tensor  # indices into the (mini)batch it was cut from
    prep: dict[str, torch.Tensor] | None = None
    # Where the policy's logits are needed (None: everywhere), as _Responses.part makes it.
    response: _Response | None = None


@dataclass
class _Response:
    """A micro-batch's response tokens, k per row (k: its rows' most; rows with fewer are
    filled with positions outside their responses, `valid` False), and the positions of the
    hidden states [s, b] flattened whose logits predict them: the one before each."""

    positions: torch.Tensor  # [rows, k]
    valid: torch.Tensor  # [rows, k]
    logit_index: torch.Tensor  # [rows * k]


@dataclass
class _Responses:
    """Every row's response positions first, in order, then the rest ([B, T]); how many."""

    order: torch.Tensor
    counts: torch.Tensor  # [B], on the device
    host_counts: list[int]

    def part(self, m: MicroBatch, rows: torch.Tensor) -> _Response:
        k = max(1, max(self.host_counts[r] for r in m.rows))
        positions = self.order[rows, :k]
        valid = torch.arange(k, device=rows.device) < self.counts[rows, None]
        index = (positions - 1).clamp(min=0) * len(m.rows)
        index = index + torch.arange(len(m.rows), device=rows.device)[:, None]
        return _Response(positions, valid, index.flatten())


@dataclass
class _Plans:
    """A step's micro-batches, per model kind: "policy" (the policy and the reference) and
    "value" (the value model, whose rows stop at their last value index), for the whole
    batch (prepare) and for each minibatch, with the positions each row needs."""

    lengths: dict[str, list[int]]
    prepare: dict[str, list[MicroBatch]]
    minibatches: dict[str, list[list[MicroBatch]]]
    responses: _Responses

    def padding_fraction(self) -> float:
        """Padding's share of the positions the step's passes run: the policy, the reference
        and the value model over the batch, then the policy and value over each minibatch."""
        passes = [(self.prepare[k], self.lengths[k]) for k in ("policy", "policy", "value")]
        passes += [(p, self.lengths[k]) for k, plans in self.minibatches.items() for p in plans]
        return padding_fraction(passes)


# prepare()'s per-row results, and which of them are per token ([B, T]; the rest are [B, K]).
_PER_ROW = ("logp_old", "values_old", "returns", "adv")
_PER_TOKEN = frozenset({"logp_old"})


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
        batching: Batching = "bucketed",
        micro_batch_tokens: int = 4096,
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
        if batching not in ("padded", "bucketed"):
            raise ValueError(f"batching must be 'padded' or 'bucketed', got {batching!r}")
        self.batching = batching
        self.mbs = micro_batch_size  # "padded": rows per micro-batch
        self.micro_batch_tokens = micro_batch_tokens  # "bucketed": rows x length per micro-batch
        self.multiple = sequence_multiple(policy.config)
        self.temperature = temperature
        self.device = next(policy.parameters()).device
        self.mismatch = mismatch or MismatchLimits()  # its quantile_limit: what counts
        # The policy's and the reference's logits only where a loss reads them (response
        # tokens: a sixth of the demo's tokens), on the bucketed path: the output layer gets
        # those hidden states alone (_select_hidden). Not under sequence parallelism, where
        # the output layer gathers the sequence itself.
        self._logit_index: torch.Tensor | None = None
        self.select_logits = batching == "bucketed" and not policy.config.sequence_parallel
        if self.select_logits:
            for model in (policy, reference):
                if getattr(model, "output_layer", None) is not None:  # the last stage's
                    model.output_layer.register_forward_pre_hook(
                        self._select_hidden, with_kwargs=True
                    )
        # Made once per longest length seen; every micro-batch takes views of them.
        self._causal = causal_mask(0, self.device)
        self._arange = torch.arange(0, device=self.device)

    # --- micro-batches ----------------------------------------------------------------------

    def _mask(self, length: int) -> torch.Tensor:
        """Megatron's causal mask for `length` positions: a view of the longest made so far
        (the top-left corner of a causal mask is the shorter causal mask). Under the causal
        mask type neither SDPA nor TE reads it; megatron's own attention would."""
        if self._causal.shape[-1] < length:
            self._causal = causal_mask(length, self.device)
        return self._causal[..., :length, :length]

    def _select_hidden(self, module: Any, args: tuple, kwargs: dict) -> Any:
        """The output layer's forward pre-hook: while `_run` feeds it a micro-batch with
        `_logit_index` set, only those hidden states ([s, b, h] -> [n, 1, h]); the model then
        returns logits [1, n, vocab shard]. Otherwise (any other caller) a no-op."""
        if self._logit_index is None:
            return None
        hidden = args[0].flatten(0, 1)[self._logit_index].unsqueeze(1)
        return (hidden, *args[1:]), kwargs

    def _positions(self, rows: int, length: int) -> torch.Tensor:
        if self._arange.shape[0] < length:
            self._arange = torch.arange(length, device=self.device)
        return self._arange[:length].expand(rows, length)

    def _plan(self, rows: list[int], lengths: list[int], length: int) -> list[MicroBatch]:
        """Micro-batches of `rows` (indices into a batch of sequences `length` long whose rows
        need `lengths` positions each)."""
        if self.batching == "padded":
            return padded_plan(rows, self.mbs, length)
        return bucketed_plan(rows, lengths, self.micro_batch_tokens, self.multiple)

    def plans(self, batch: ppo.PPOBatch, num_minibatches: int = 1) -> _Plans:
        """Every micro-batch of a step on `batch` from one read of its rows' lengths (the
        plans' only device sync), with as many per minibatch on every data-parallel rank."""
        b, t = batch.tokens.shape
        if b % num_minibatches:
            raise ValueError(f"{b} sequences do not split into {num_minibatches} minibatches")
        if t % self.multiple:
            raise ValueError(
                f"sequences of {t} tokens: the model needs multiples of {self.multiple} "
                "(collate(..., multiple=sequence_multiple(config)))"
            )
        size = b // num_minibatches
        counts = batch.response_mask.sum(1)
        policy, value, host_counts = torch.stack(
            [ppo.row_lengths(batch), ppo.value_lengths(batch), counts]
        ).tolist()
        lengths = {"policy": policy, "value": value}
        response_first = (~batch.response_mask).to(torch.int32)
        responses = _Responses(
            torch.argsort(response_first, dim=1, stable=True), counts, host_counts
        )
        return _Plans(
            lengths,
            {k: self._plan(list(range(b)), lengths[k], t) for k in lengths},
            self._same_count(
                {
                    k: [
                        self._plan(list(range(m * size, (m + 1) * size)), lengths[k], t)
                        for m in range(num_minibatches)
                    ]
                    for k in lengths
                },
                lengths,
            ),
            responses,
        )

    def _parts(
        self,
        batch: ppo.PPOBatch,
        plan: list[MicroBatch],
        prep: dict[str, torch.Tensor] | None = None,
        responses: _Responses | None = None,
    ) -> list[_Part]:
        """`plan`'s micro-batches of `batch` (and of `prep`'s per-row results; with
        `responses`, where the policy's logits are needed): the row indices go to the device
        in one copy; each part is cut to its length before its rows are gathered, so only
        what it runs is copied."""
        index = torch.tensor([r for m in plan for r in m.rows], device=self.device)
        parts, start = [], 0
        for m in plan:
            rows = index[start : start + len(m.rows)]
            start += len(m.rows)
            sub = None
            if prep is not None:
                sub = {
                    k: (prep[k][:, : m.length] if k in _PER_TOKEN else prep[k])[rows]
                    for k in _PER_ROW
                }
                sub["num_tokens"], sub["num_turns"] = prep["num_tokens"], prep["num_turns"]
            response = responses.part(m, rows) if responses is not None else None
            parts.append(_Part(batch.narrow(m.length).select(rows), rows, sub, response))
        return parts

    # --- passes -----------------------------------------------------------------------------

    def _run(
        self, model: torch.nn.Module, parts: list[_Part], loss: Callable, forward_only: bool
    ) -> list:
        """`parts` through `model` as micro-batches; returns what `loss(part, output)` reported
        per micro-batch (on the last pipeline stage; nothing elsewhere)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(data: Any, model: torch.nn.Module) -> Any:
            part = next(data)
            rows, length = part.batch.tokens.shape
            self._logit_index = part.response.logit_index if part.response else None
            try:
                output = model(part.batch.tokens, self._positions(rows, length), self._mask(length))
            finally:
                self._logit_index = None
            return output, partial(loss, part)

        # The schedule's shape is every micro-batch's under "padded"; under "bucketed" and
        # pipeline parallelism the p2p exchange sends each one's (variable_seq_lengths).
        out = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(parts),
            model=[model],
            num_microbatches=len(parts),
            seq_length=max(p.batch.tokens.shape[1] for p in parts),
            micro_batch_size=max(p.batch.tokens.shape[0] for p in parts),
            forward_only=forward_only,
        )
        return [o for o in out if o] if isinstance(out, list) else []

    def _token_logprobs(
        self, logits: torch.Tensor, part: _Part
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's logits on `part` -> (logp, entropy) [b, s] of its tokens: position 0
        zero, and with the logits selected (part.response), every position outside the
        responses zero too (no loss reads them)."""
        tokens = part.batch.tokens
        if part.response is None:
            return next_token_logprobs(logits, tokens, self.temperature)
        r = part.response
        rows, k = r.positions.shape
        logp, entropy = vocab_parallel_logprobs(
            logits.reshape(rows, k, logits.shape[-1]),
            tokens.gather(1, r.positions),
            self.temperature,
        )
        zeros = torch.zeros(tokens.shape, dtype=logp.dtype, device=logp.device)
        valid = r.valid.to(logp.dtype)
        return (
            zeros.scatter(1, r.positions, logp * valid),
            zeros.scatter(1, r.positions, entropy * valid),
        )

    def _collect_logprobs(
        self, model: torch.nn.Module, batch: ppo.PPOBatch, parts: list[_Part]
    ) -> torch.Tensor | None:
        """[B, T] log-probs of `batch`'s tokens, put back in the batch's rows and positions
        (zero past each micro-batch's length, where no loss reads)."""

        def loss(part, logits):
            logp, _ = self._token_logprobs(logits.detach(), part)
            return logp.new_zeros(()), {"logp": logp}

        got = self._run(model, parts, loss, forward_only=True)
        if not got:
            return None
        out = torch.zeros(batch.tokens.shape, device=self.device)
        for part, g in zip(parts, got, strict=True):
            out[part.rows, : g["logp"].shape[1]] = g["logp"]
        return out

    def _collect_values(self, batch: ppo.PPOBatch, parts: list[_Part]) -> torch.Tensor | None:
        def loss(part, values):
            v = values.detach().squeeze(-1).float().gather(1, part.batch.value_index)
            return v.new_zeros(()), {"values": v}

        got = self._run(self.trainables["value"].model, parts, loss, forward_only=True)
        if not got:
            return None
        out = torch.zeros(batch.value_index.shape, device=self.device)
        for part, g in zip(parts, got, strict=True):
            out[part.rows] = g["values"]
        return out

    # --- the update -------------------------------------------------------------------------

    @torch.no_grad()
    def prepare(
        self, batch: ppo.PPOBatch, plans: _Plans | None = None
    ) -> dict[str, torch.Tensor] | None:
        """pi_old, reference log-probs, V_old, returns, advantages (last stage only), in
        `plans`' micro-batches (default: the batch's own)."""
        ps = _ps()
        plans = plans or self.plans(batch)
        responses = plans.responses if self.select_logits else None
        policy = self._parts(batch, plans.prepare["policy"], responses=responses)
        logp_old = self._collect_logprobs(self.trainables["policy"].model, batch, policy)
        logp_ref = self._collect_logprobs(self.reference, batch, policy)
        values_old = self._collect_values(batch, self._parts(batch, plans.prepare["value"]))
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
        plans = self.plans(batch, num_minibatches)
        prep = self.prepare(batch, plans)
        if prep is not None:
            # Each minibatch's response tokens and turns over all data-parallel ranks (the
            # losses' normalisers), every minibatch's in one all-reduce.
            counts = torch.stack(
                [
                    batch.response_mask.reshape(num_minibatches, -1).sum(1),
                    batch.turn_mask.reshape(num_minibatches, -1).sum(1),
                ],
                1,
            ).double()
            dist.all_reduce(counts, group=ps.get_data_parallel_group())
        totals: dict[str, float] = {}
        minibatches = range(num_minibatches)
        if progress:
            minibatches = progress_bar(minibatches, desc="update", unit="minibatch")
        for m in minibatches:
            sub_prep = None
            if prep is not None:
                sub_prep = {**prep, "num_tokens": counts[m, 0], "num_turns": counts[m, 1]}
            responses = plans.responses if self.select_logits else None
            parts = {
                "policy": self._parts(batch, plans.minibatches["policy"][m], sub_prep, responses),
                "value": self._parts(batch, plans.minibatches["value"][m], sub_prep),
            }
            for key, value in self._update(parts).items():
                totals[key] = totals.get(key, 0.0) + value / num_minibatches
        totals["padding_fraction"] = plans.padding_fraction()  # this rank's
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

    def _same_count(
        self, plans: dict[str, list[list[MicroBatch]]], lengths: dict[str, list[int]]
    ) -> dict[str, list[list[MicroBatch]]]:
        """The minibatches' plans (per model kind) with as many micro-batches on every
        data-parallel rank as on the one that needs most (one all-reduce for all of them):
        the schedules run no-sync until their last micro-batch, where the gradient reduction
        starts, and every rank must start it together. Fixed-size micro-batches agree."""
        ps = _ps()
        if self.batching == "padded" or ps.get_data_parallel_world_size() == 1:
            return plans
        kinds = list(plans)
        counts = torch.tensor([[len(p) for p in plans[k]] for k in kinds], device=self.device)
        dist.all_reduce(counts, op=dist.ReduceOp.MAX, group=ps.get_data_parallel_group())
        return {
            k: [
                split_to(p, n, lengths[k], self.multiple)
                for p, n in zip(plans[k], row, strict=True)
            ]
            for k, row in zip(kinds, counts.tolist(), strict=True)
        }

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

    def _update(self, parts: dict[str, list[_Part]]) -> dict[str, float]:
        """One optimizer step of the policy and one of the value model on a minibatch's
        `parts` of each (with prepare's results and the minibatch's token and turn counts on
        the last stage)."""
        ps = _ps()
        # The losses are means over the whole minibatch already (divided by its counts, not
        # by a micro-batch's), but the schedule divides by the number of micro-batches and
        # DDP averages gradients over data-parallel ranks: undo both.
        scale = {k: len(p) * ps.get_data_parallel_world_size() for k, p in parts.items()}

        def policy_loss(part, logits):
            prep, chunk = part.prep, part.batch
            logp, entropy = self._token_logprobs(logits, part)
            loss, metrics = ppo.policy_loss(
                logp,
                prep["logp_old"],
                chunk.logp_behaviour,
                ppo.token_advantages(prep["adv"], chunk),
                chunk.response_mask,
                self.ppo,
                prep["num_tokens"],
            )
            mask = chunk.response_mask
            metrics["entropy"] = (entropy.detach() * mask).sum() / prep["num_tokens"]
            metrics["policy_loss"] = loss.detach()
            return loss * scale["policy"], metrics

        def value_loss(part, values):
            prep, chunk = part.prep, part.batch
            v = values.squeeze(-1).float().gather(1, chunk.value_index)
            loss = ppo.value_loss(
                v,
                prep["values_old"],
                prep["returns"],
                chunk.turn_mask,
                self.ppo,
                prep["num_turns"],
            )
            return loss * scale["value"], {"value_loss": loss.detach()}

        metrics: dict[str, float] = {}
        for name, loss_fn in (("policy", policy_loss), ("value", value_loss)):
            trainable = self.trainables[name]
            trainable.model.zero_grad_buffer()
            trainable.optimizer.zero_grad()
            got = self._run(trainable.model, parts[name], loss_fn, forward_only=False)
            trainable.finish_grads()
            _, norm, _ = trainable.step()
            trainable.scheduler.step(1)
            metrics[f"{name}_grad_norm"] = float(norm)
            metrics.update(self._reduce(got, ps))
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
