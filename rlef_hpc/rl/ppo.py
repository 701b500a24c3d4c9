"""The RLEF PPO objective, on padded batches of trajectories.

Positions: `logp[:, i]` is log p(tokens[i] | tokens[:i]) (position 0 is unused), so a response
token at position i is trained through the logits at i - 1. Per turn t of a trajectory:

  R_t = r_t - beta * mean_{i in response t} (logp_old[i] - logp_ref[i])   (KL in the reward: the
        log-ratio of the whole response as the geometric mean of its token probabilities)
  G_t = sum_{s >= t} R_s                                                    (Monte-Carlo, gamma 1)
  A_t = G_t - V_old(c_t),  V read at the turn's last prompt token; normalised over the batch's
        turns (each turn once, whatever its length)
  policy loss, per response token i of turn t, averaged over all response tokens:
        -w_i * min(rho_i A_t, clip(rho_i, 1 - eps, 1 + eps) A_t),
        rho_i = exp(logp[i] - logp_old[i]),  w_i = stopgrad(min(exp(logp_old[i] - logp_beh[i]), 1))
        (the truncated importance weight corrects for rollouts sampled by an older policy)
  value loss, per turn: 0.5 * max((V - G)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - G)^2)

"old" is the policy at the start of this batch's updates, as the trainer computes it; the
engine's own log-probs (`behaviour`) only enter through w, since its numerics differ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch


@dataclass(frozen=True)
class PPOConfig:
    """The PPO objective's coefficients (the paper's by default)."""

    kl_coef: float = 0.05
    clip: float = 0.2
    value_clip: float = 0.2
    truncate_is: bool = True
    advantage_normalisation: Literal["turn", "none"] = "turn"

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and value < 0:
                raise ValueError(f"ppo.{f.name} must be non-negative, got {value}")


@dataclass
class PPOBatch:
    """Padded trajectories. B sequences of T tokens, at most K turns each."""

    tokens: torch.Tensor  # [B, T] long
    response_mask: torch.Tensor  # [B, T] bool: tokens the policy produced
    turn_of_token: torch.Tensor  # [B, T] long: the turn a response token belongs to, else -1
    value_index: torch.Tensor  # [B, K] long: the last prompt token of each turn
    turn_mask: torch.Tensor  # [B, K] bool
    turn_reward: torch.Tensor  # [B, K] float: environment reward (penalties, terminal)
    logp_behaviour: torch.Tensor  # [B, T] float: the engine's log-probs of sampled tokens

    def to(self, device: Any) -> PPOBatch:
        return PPOBatch(*(getattr(self, f.name).to(device) for f in fields(self)))

    def select(self, rows: slice | torch.Tensor) -> PPOBatch:
        return PPOBatch(*(getattr(self, f.name)[rows] for f in fields(self)))

    def narrow(self, length: int) -> PPOBatch:
        """The first `length` positions of every sequence (per-turn fields unchanged): views."""
        return PPOBatch(
            *(
                getattr(self, f.name)[:, :length]
                if f.name in TOKEN_FIELDS
                else getattr(self, f.name)
                for f in fields(self)
            )
        )


# The [B, T] fields of PPOBatch (the others are per turn, [B, K]).
TOKEN_FIELDS = frozenset({"tokens", "response_mask", "turn_of_token", "logp_behaviour"})


@dataclass(frozen=True)
class Targets:
    """What one micro-batch's losses compare against: its rows of the step's Prepared
    (logp_old cut to its length) and its minibatch's normalisers."""

    logp_old: torch.Tensor  # [b, length]
    values_old: torch.Tensor  # [b, K]
    returns: torch.Tensor  # [b, K]
    adv: torch.Tensor  # [b, K]
    num_tokens: torch.Tensor  # the minibatch's response tokens, over all data-parallel ranks
    num_turns: torch.Tensor  # its turns, likewise


@dataclass(frozen=True)
class Prepared:
    """What a step fixes before its minibatch updates, on the batch (this data-parallel
    rank's share): pi_old's and the frozen reference's log-probs, V_old, the returns and
    advantages (normalised over every rank's turns), the per-turn KL estimate, and each
    minibatch's loss normalisers."""

    logp_old: torch.Tensor  # [B, T]
    logp_ref: torch.Tensor  # [B, T]
    values_old: torch.Tensor  # [B, K]
    returns: torch.Tensor  # [B, K]
    adv: torch.Tensor  # [B, K]
    kl: torch.Tensor  # [B, K]
    explained_variance: float
    num_tokens: torch.Tensor  # [minibatches], float64: response tokens over all DP ranks
    num_turns: torch.Tensor  # [minibatches], float64: turns, likewise

    def targets(self, rows: torch.Tensor, length: int, minibatch: int) -> Targets:
        """Rows `rows` (of minibatch `minibatch`), cut to `length` positions."""
        return Targets(
            self.logp_old[:, :length][rows],
            self.values_old[rows],
            self.returns[rows],
            self.adv[rows],
            self.num_tokens[minibatch],
            self.num_turns[minibatch],
        )


def row_lengths(batch: PPOBatch) -> torch.Tensor:
    """[B]: the positions of each sequence that the policy's losses read, through its last
    response token or value index, whichever is later (at least 1). Under causal attention
    nothing after them changes what is read, so a sequence can run cut or padded to any length
    that covers them and give the same losses."""
    t = batch.tokens.shape[1]
    positions = torch.arange(t, device=batch.tokens.device)
    last_response = torch.where(batch.response_mask, positions, -1).amax(1)
    return torch.maximum(last_response + 1, value_lengths(batch))


def value_lengths(batch: PPOBatch) -> torch.Tensor:
    """[B]: the positions of each sequence that the value model's losses read, through its
    last value index (the last turn's prompt): that turn's response is never needed."""
    last_value = torch.where(batch.turn_mask, batch.value_index, -1).amax(1)
    return (last_value + 1).clamp(min=1)


def collate(
    trajectories: list[Any],
    pad_id: int = 0,
    device: torch.device | str | None = None,
    multiple: int = 1,
) -> PPOBatch:
    """Trajectories (rlef_hpc.data.Trajectory) into a padded batch on `device` (the model's;
    default the CPU): built row by row on the host, then moved in one copy per tensor. The
    length is rounded up to a `multiple` (rlef_hpc.models.gpt.sequence_multiple: FP8,
    sequence parallelism); padding is masked out of every loss, and causal attention keeps
    it from the real tokens' outputs.

    A trajectory that is not `trainable` (the sandbox failed to judge it) gets an empty row: no
    response, no turns, so no loss, advantage statistic, KL or mismatch reads it and it runs
    one position long (row_lengths). It keeps its row rather than being dropped so that every
    data-parallel rank keeps its share's row count, which the minibatch split and the equal
    micro-batch counts across ranks depend on (rl.batching.plan_step)."""
    b = len(trajectories)
    kept = [x for x in trajectories if x.trainable]
    t = -(-max([len(x.tokens) for x in kept] or [1]) // multiple) * multiple
    k = max([len(x.turns) for x in kept] or [1])
    tokens = torch.full((b, t), pad_id, dtype=torch.long)
    response = torch.zeros((b, t), dtype=torch.bool)
    turn_of = torch.full((b, t), -1, dtype=torch.long)
    value_index = torch.zeros((b, k), dtype=torch.long)
    turn_mask = torch.zeros((b, k), dtype=torch.bool)
    reward = torch.zeros((b, k))
    behaviour = torch.zeros((b, t))
    for row, traj in enumerate(trajectories):
        if not traj.trainable:
            continue
        tokens[row, : len(traj.tokens)] = torch.tensor(traj.tokens)
        for j, turn in enumerate(traj.turns):
            span = slice(turn.prompt_end, turn.response_end)
            response[row, span] = True
            turn_of[row, span] = j
            behaviour[row, span] = torch.tensor(turn.behaviour_logprobs)
            value_index[row, j] = turn.value_index
            turn_mask[row, j] = True
            reward[row, j] = turn.reward
    batch = PPOBatch(tokens, response, turn_of, value_index, turn_mask, reward, behaviour)
    return batch if device is None else batch.to(device)


def per_turn_mean(values: torch.Tensor, batch: PPOBatch) -> torch.Tensor:
    """[B, T] token values -> [B, K] means over each turn's response tokens."""
    k = batch.turn_mask.shape[1]
    index = batch.turn_of_token.clamp(min=0)
    weight = batch.response_mask.to(values.dtype)
    sums = values.new_zeros(values.shape[0], k).scatter_add_(1, index, values * weight)
    counts = values.new_zeros(values.shape[0], k).scatter_add_(1, index, weight)
    return sums / counts.clamp(min=1)


def rewards_with_kl(
    batch: PPOBatch, logp_old: torch.Tensor, logp_ref: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(R [B, K], the per-turn KL estimate [B, K])."""
    kl = per_turn_mean(logp_old - logp_ref, batch)
    return (batch.turn_reward - kl_coef * kl) * batch.turn_mask, kl * batch.turn_mask


def monte_carlo_returns(rewards: torch.Tensor, turn_mask: torch.Tensor) -> torch.Tensor:
    rewards = rewards * turn_mask
    return (rewards.flip(1).cumsum(1).flip(1)) * turn_mask


def _sums(group: Any, *values: torch.Tensor) -> list[float]:
    """The tensors' sums, added over `group`'s ranks (every data-parallel rank's share of the
    batch) when a group is given; in float64, so that the statistics do not depend on how the
    batch is split."""
    sums = torch.stack([v.sum() for v in values]).double()
    if group is not None:
        torch.distributed.all_reduce(sums, group=group)
    return sums.tolist()


def advantages(
    returns: torch.Tensor,
    values_old: torch.Tensor,
    turn_mask: torch.Tensor,
    normalisation: str,
    group: Any = None,
) -> torch.Tensor:
    """A_t = G_t - V_old(c_t), normalised ("turn") by the mean and standard deviation over
    every turn of the whole batch (all ranks of `group`)."""
    adv = (returns - values_old) * turn_mask
    if normalisation == "none":
        return adv
    total, squares, turns = _sums(group, adv, adv**2, turn_mask.float())
    mean = total / turns
    std = math.sqrt(max(squares / turns - mean**2, 0.0))
    return (adv - mean) / (std + 1e-8) * turn_mask


def explained_variance(
    returns: torch.Tensor, values_old: torch.Tensor, turn_mask: torch.Tensor, group: Any = None
) -> float:
    """1 - Var(G - V_old) / Var(G) over the whole batch's turns (NaN when the returns do not
    vary): how much of the returns the value model predicts."""
    residual = (returns - values_old) * turn_mask
    returns = returns * turn_mask
    g_sum, g_sq, r_sum, r_sq, turns = _sums(
        group, returns, returns**2, residual, residual**2, turn_mask.float()
    )
    var_g = g_sq / turns - (g_sum / turns) ** 2
    var_r = r_sq / turns - (r_sum / turns) ** 2
    return 1 - var_r / var_g if var_g > 0 else float("nan")


def token_advantages(adv: torch.Tensor, batch: PPOBatch) -> torch.Tensor:
    """[B, K] per-turn advantages -> [B, T], zero outside responses."""
    return adv.gather(1, batch.turn_of_token.clamp(min=0)) * batch.response_mask


def policy_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    logp_behaviour: torch.Tensor,
    token_adv: torch.Tensor,
    mask: torch.Tensor,
    config: PPOConfig,
    num_tokens: int | torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sum over `mask` tokens divided by `num_tokens` (the whole batch's count, so that micro-
    batches and data-parallel ranks add up to the batch mean)."""
    mask = mask.to(logp.dtype)
    log_ratio = (logp - logp_old) * mask
    ratio = torch.exp(log_ratio)
    if config.truncate_is:
        weight = torch.exp((logp_old - logp_behaviour) * mask).clamp(max=1.0).detach()
    else:
        weight = torch.ones_like(ratio)
    unclipped = ratio * token_adv
    clipped = ratio.clamp(1.0 - config.clip, 1.0 + config.clip) * token_adv
    loss = -(weight * torch.minimum(unclipped, clipped) * mask).sum() / num_tokens
    with torch.no_grad():
        metrics = {
            "clip_fraction": (((ratio - 1).abs() > config.clip).to(logp.dtype) * mask).sum()
            / num_tokens,
            "approx_kl": (((ratio - 1) - log_ratio) * mask).sum() / num_tokens,
            "is_weight": (weight * mask).sum() / num_tokens,
        }
    return loss, metrics


def value_loss(
    values: torch.Tensor,
    values_old: torch.Tensor,
    returns: torch.Tensor,
    turn_mask: torch.Tensor,
    config: PPOConfig,
    num_turns: int | torch.Tensor,
) -> torch.Tensor:
    mask = turn_mask.to(values.dtype)
    clipped = values_old + (values - values_old).clamp(-config.value_clip, config.value_clip)
    loss = torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return 0.5 * (loss * mask).sum() / num_turns
