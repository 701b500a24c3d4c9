"""The PPO objective against a plain-PyTorch reference written here, one token at a time."""

from __future__ import annotations

import math

import pytest
import torch

from rlef_hpc.data.trajectory import Trajectory, Turn
from rlef_hpc.rl.ppo import (
    PPOConfig,
    advantages,
    collate,
    monte_carlo_returns,
    policy_loss,
    rewards_with_kl,
    token_advantages,
    value_loss,
)

# Three trajectories: (prompt_start, prompt_end, response_end, env reward) per turn.
SHAPES = [
    [(0, 5, 9, -0.2), (9, 12, 15, 1.0)],
    [(0, 4, 6, 0.0), (6, 9, 13, 0.0), (13, 15, 18, -1.0)],
    [(0, 6, 11, 1.0)],
]


def make_trajectories(gen: torch.Generator) -> list[Trajectory]:
    out = []
    for shape in SHAPES:
        length = shape[-1][2]
        turns = [
            Turn(
                ps, pe, re, (-torch.rand(re - pe, generator=gen)).tolist(), "", "x", True, reward=r
            )
            for ps, pe, re, r in shape
        ]
        out.append(
            Trajectory(
                "p", "python", torch.randint(1, 50, (length,), generator=gen).tolist(), turns, True
            )
        )
    return out


def reference(trajs, logp, logp_old, logp_ref, values, values_old, cfg):
    """Token by token, turn by turn: no shared code with the implementation."""
    turns = []  # (row, k, positions, env reward)
    for row, traj in enumerate(trajs):
        for k, turn in enumerate(traj.turns):
            turns.append((row, k, list(range(turn.prompt_end, turn.response_end)), turn.reward))
    shaped = {}
    for row, k, pos, r in turns:
        kl = sum(float(logp_old[row, i] - logp_ref[row, i]) for i in pos) / len(pos)
        shaped[row, k] = r - cfg.kl_coef * kl
    returns = {}
    for row, k, _, _ in turns:
        returns[row, k] = sum(v for (r2, k2), v in shaped.items() if r2 == row and k2 >= k)
    raw = {key: returns[key] - float(values_old[key]) for key in returns}
    mean = sum(raw.values()) / len(raw)
    std = math.sqrt(sum((a - mean) ** 2 for a in raw.values()) / len(raw))
    adv = {key: (a - mean) / (std + 1e-8) for key, a in raw.items()}
    n_tokens = sum(len(pos) for _, _, pos, _ in turns)
    p_loss = 0
    for row, k, pos, _ in turns:
        for i in pos:
            rho = torch.exp(logp[row, i] - logp_old[row, i])
            w = min(
                math.exp(
                    float(logp_old[row, i] - trajs[row].turns[k].behaviour_logprobs[i - pos[0]])
                ),
                1.0,
            )
            a = adv[row, k]
            p_loss = p_loss - w * torch.minimum(
                rho * a, torch.clamp(rho, 1 - cfg.clip, 1 + cfg.clip) * a
            )
    p_loss = p_loss / n_tokens
    v_loss = 0
    for row, k, _, _ in turns:
        v, v_old, g = values[row, k], float(values_old[row, k]), returns[row, k]
        v_clip = v_old + torch.clamp(v - v_old, -cfg.value_clip, cfg.value_clip)
        v_loss = v_loss + 0.5 * torch.maximum((v - g) ** 2, (v_clip - g) ** 2)
    return p_loss, v_loss / len(turns), returns


@pytest.mark.parametrize("seed", range(5))
def test_losses_and_gradients_match_the_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    trajs = make_trajectories(gen)
    batch = collate(trajs)
    b, t = batch.tokens.shape
    k = batch.turn_mask.shape[1]
    logp_old = -torch.rand(b, t, generator=gen) * 3
    logp_ref = logp_old - 0.3 * torch.randn(b, t, generator=gen)
    logp = (logp_old + 0.4 * torch.randn(b, t, generator=gen)).requires_grad_()  # some clipped
    values_old = torch.randn(b, k, generator=gen)
    values = (values_old + 0.5 * torch.randn(b, k, generator=gen)).requires_grad_()
    cfg = PPOConfig()

    rewards, kl = rewards_with_kl(batch, logp_old, logp_ref, cfg.kl_coef)
    returns = monte_carlo_returns(rewards, batch.turn_mask)
    adv = advantages(returns, values_old, batch.turn_mask, cfg.advantage_normalisation)
    n_tokens = int(batch.response_mask.sum())
    loss, metrics = policy_loss(
        logp,
        logp_old,
        batch.logp_behaviour,
        token_advantages(adv, batch),
        batch.response_mask,
        cfg,
        n_tokens,
    )
    v_loss = value_loss(
        values, values_old, returns, batch.turn_mask, cfg, int(batch.turn_mask.sum())
    )

    logp_ref_copy = logp.detach().clone().requires_grad_()
    values_ref_copy = values.detach().clone().requires_grad_()
    ref_loss, ref_v_loss, ref_returns = reference(
        trajs, logp_ref_copy, logp_old, logp_ref, values_ref_copy, values_old, cfg
    )
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-6)
    assert v_loss.item() == pytest.approx(ref_v_loss.item(), abs=1e-6)
    for (row, j), g in ref_returns.items():
        assert returns[row, j].item() == pytest.approx(g, abs=1e-6)
    (loss + v_loss).backward()
    (ref_loss + ref_v_loss).backward()
    torch.testing.assert_close(logp.grad, logp_ref_copy.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(values.grad, values_ref_copy.grad, atol=1e-6, rtol=1e-5)
    # Tokens outside responses (prompts, padding) get no gradient at all.
    assert (logp.grad[~batch.response_mask] == 0).all()
    assert 0 < metrics["clip_fraction"] < 1


def test_collate_positions():
    trajs = make_trajectories(torch.Generator().manual_seed(0))
    batch = collate(trajs)
    assert batch.value_index.tolist() == [[4, 11, 0], [3, 8, 14], [5, 0, 0]]
    assert batch.turn_mask.tolist() == [
        [True, True, False],
        [True, True, True],
        [True, False, False],
    ]
    assert batch.response_mask[0].nonzero().flatten().tolist() == [5, 6, 7, 8, 12, 13, 14]
    assert batch.turn_of_token[1, 12].item() == 1 and batch.turn_of_token[1, 13].item() == -1
    assert batch.turn_reward[0].tolist() == pytest.approx([-0.2, 1.0, 0.0])


def test_truncated_importance_weight_only_shrinks():
    logp_old = torch.tensor([[0.0, -1.0, -1.0]])
    behaviour = torch.tensor([[0.0, -2.0, -0.5]])  # old more likely than behaviour at 1, less at 2
    logp = logp_old.clone().requires_grad_()
    mask = torch.tensor([[False, True, True]])
    adv = torch.tensor([[0.0, 1.0, 1.0]])
    loss, m = policy_loss(logp, logp_old, behaviour, adv, mask, PPOConfig(), 2)
    loss.backward()
    # d/dlogp of -w * rho * A at rho = 1 is -w * A: w = min(e^1, 1) = 1 and min(e^-0.5, 1).
    assert logp.grad.tolist()[0] == pytest.approx([0.0, -0.5, -0.5 * math.exp(-0.5)])
    assert m["is_weight"].item() == pytest.approx((1 + math.exp(-0.5)) / 2)


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="ppo.kl_coef must be non-negative"):
        PPOConfig(kl_coef=-0.1)
