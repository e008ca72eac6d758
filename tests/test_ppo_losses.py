"""minift.losses.ppo against values worked out by hand (the arithmetic is in each test's comments)."""

from __future__ import annotations

import math

import pytest
import torch

from minift.losses import (
    AdaptiveKLController,
    gae_advantages,
    kl_penalized_rewards,
    masked_moments,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_gae_by_reverse_scan():
    # gamma 1, lambda 0.9; row 0: r = [0, 0, 1], V = [.5, .6, .7]
    #   d2 = 1 + 0 - .7 = .3 -> A2 = .3;  d1 = 0 + .7 - .6 = .1 -> A1 = .1 + .9 * .3 = .37
    #   d0 = 0 + .6 - .5 = .1 -> A0 = .1 + .9 * .37 = .433;  returns = A + V = [.933, .97, 1]
    # row 1 has 2 tokens (the third is padding, whose reward 5 and value 9 must not leak in):
    #   d1 = -1 + 0 - .5 = -1.5 -> A1 = -1.5;  d0 = .2 + .5 - 1 = -.3 -> A0 = -.3 + .9 * -1.5 = -1.65
    rewards, values = t([0, 0, 1], [.2, -1, 5]), t([.5, .6, .7], [1, .5, 9])
    mask = t([1, 1, 1], [1, 1, 0])
    adv, ret = gae_advantages(rewards, values, mask, gamma=1.0, lam=0.9)
    assert torch.allclose(adv, t([.433, .37, .3], [-1.65, -1.5, 0]))
    assert torch.allclose(ret, t([.933, .97, 1.0], [-.65, -1.0, 0]))
    # gamma .5, lambda 1 on row 1: d1 = -1.5 -> A1 = -1.5; d0 = .2 + .5 * .5 - 1 = -.55 -> A0 = -.55 + .5 * -1.5 = -1.3
    adv, _ = gae_advantages(rewards[1:], values[1:], mask[1:], gamma=0.5, lam=1.0)
    assert torch.allclose(adv, t([-1.3, -1.5, 0]))


def test_whitening_over_the_mask():
    # masked [1, 2, 3]: mean 2, Bessel variance (1 + 0 + 1) / 2 = 1 -> [-1, 0, 1]; the 4th position is outside
    x, mask = t([1, 2, 3, 40]), t([1, 1, 1, 0])
    assert torch.allclose(masked_whiten(x, mask), t([-1, 0, 1, 0]))
    assert torch.allclose(masked_whiten(x, mask, shift_mean=False), t([1, 2, 3, 0]))
    assert torch.allclose(masked_whiten(2 * x, mask, shift_mean=False), t([3, 4, 5, 0]))  # [2, 4, 6]: (x - 4) / 2 + 4
    with pytest.raises(ValueError, match="at least 2"):
        masked_whiten(x, t([1, 0, 0, 0]))
    # a batch split in two (as over two processes): the summed moments whiten each part as the whole
    left, right = masked_moments(x[:, :2], mask[:, :2]), masked_moments(x[:, 2:], mask[:, 2:])
    assert torch.equal(left + right, t(3, 6, 14))
    assert torch.allclose(masked_whiten(x[:, 2:], mask[:, 2:], moments=left + right), t([1, 0]))


def test_kl_penalized_rewards_put_the_score_on_the_last_token():
    # kl = logp - ref = [.5, -1, 0]; r = -.1 * kl = [-.05, .1, 0], plus the score 2 at the last token
    # row 1 (2 tokens): kl = [1, 0, pad]; r = [-.1, 0 + 3, 0]
    logps, ref = t([-1, -2, -.5], [-1, -1, -7]), t([-1.5, -1, -.5], [-2, -1, -1])
    mask = t([1, 1, 1], [1, 1, 0])
    rewards, kl = kl_penalized_rewards(t(2, 3), logps, ref, mask, kl_coef=0.1)
    assert torch.allclose(rewards, t([-.05, .1, 2.0], [-.1, 3.0, 0]))
    assert torch.allclose(kl, t([.5, -1, 0], [1, 0, 0]))
    # completions after a masked prompt (the recipes' layout): the score lands on the last masked-in position
    rewards, _ = kl_penalized_rewards(t(2, 3), logps, ref, t([0, 1, 1], [0, 1, 0]), kl_coef=0.1)
    assert torch.allclose(rewards, t([0, .1, 2.0], [0, 3.0, 0]))


def test_clipped_policy_loss():
    # ratios 1.5, .5, 1.1 with A = 1, -1, 2 and eps .2:
    #   tok 0: -1 * 1.5 = -1.5 vs -1 * 1.2 = -1.2 -> -1.2 (clipped);  tok 1: 1 * .5 = .5 vs 1 * .8 = .8 -> .8 (clipped)
    #   tok 2: -2.2 either way (not clipped);  loss = (-1.2 + .8 - 2.2) / 3 = -.8667;  clip_frac 2/3
    #   approx_kl = mean(.5 * ln(r)^2)
    old = t([-1.0, -1.0, -1.0])
    ratios = [1.5, 0.5, 1.1]
    logps = (old + torch.log(t(ratios))).requires_grad_()
    loss, metrics = ppo_policy_loss(logps, old, t([1, -1, 2]), t([1, 1, 1]), clip_range=0.2)
    assert loss.item() == pytest.approx(-2.6 / 3)
    assert metrics["clip_frac"].item() == pytest.approx(2 / 3)
    assert metrics["approx_kl"].item() == pytest.approx(sum(0.5 * math.log(r) ** 2 for r in ratios) / 3)
    loss.backward()  # only the unclipped token has a gradient: d/dlogp (-A * e^(logp - old)) / 3 = -2 * 1.1 / 3
    assert torch.allclose(logps.grad, t([0, 0, -2.2 / 3]))


def test_clipped_value_loss_and_explained_variance():
    # V = [1, 0], V_old = [.5, .5], R = [.6, .4], eps .2: clipped V = [.7, .3]; errors [.16, .16] vs [.01, .01]
    #   -> .5 * mean(.16, .16) = .08, no clipping chosen
    loss, metrics = ppo_value_loss(t([1.0, 0.0]), t([.5, .5]), t([.6, .4]), t([1, 1]), clip_range=0.2)
    assert loss.item() == pytest.approx(0.08) and metrics["value_clip_frac"].item() == 0
    # V = [.55, 1.5] = R: clipped V = [.55, .7]; errors [0, 0] vs [0, .64] -> .5 * mean(0, .64) = .16, half clipped
    loss, metrics = ppo_value_loss(t([.55, 1.5]), t([.5, .5]), t([.55, 1.5]), t([1, 1]), clip_range=0.2)
    assert loss.item() == pytest.approx(0.16) and metrics["value_clip_frac"].item() == 0.5
    assert metrics["explained_variance"].item() == pytest.approx(1.0)


def test_adaptive_kl_controller():
    # target 6, horizon 10000: KL 9 -> e = clip(.5) = .2, beta = .1 * (1 + .2 * 256 / 1e4) = .100512
    kl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert kl.update(9.0, 256) == pytest.approx(0.100512)
    # KL 3 -> e = clip(-.5) = -.2: beta = .100512 * (1 - .00512)
    assert kl.update(3.0, 256) == pytest.approx(0.100512 * (1 - 0.00512))
    # KL 6.6 -> e = .1 (inside the clip): x (1 + .1 * 1000 / 1e4) = x 1.01
    before = kl.value
    assert kl.update(6.6, 1000) == pytest.approx(before * 1.01)
    fixed = AdaptiveKLController(0.05)
    assert fixed.update(100.0, 10**6) == 0.05
    with pytest.raises(ValueError, match="target > 0"):
        AdaptiveKLController(0.1, target=0.0)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="mask's shape"):
        gae_advantages(t([0, 1]), t([0, 1, 2]), t([1, 1]))
    with pytest.raises(ValueError, match="scores must be"):
        kl_penalized_rewards(t(1, 2), t([0.0]), t([0.0]), t([1]), kl_coef=0.1)
