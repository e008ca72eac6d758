"""minift.losses.policy: advantages, KL estimators and the GRPO surrogate against values worked by hand (the
derivations are in the comments), and the GRPO loss against trl's own ``_compute_loss``."""

from __future__ import annotations

import math

import oracles
import pytest
import torch

from minift.losses.policy import (
    GRPO_LOSS_TYPES,
    group_advantages,
    grpo_loss,
    informative_groups,
    kl_per_token,
    rloo_advantages,
    rloo_rewards,
)

# Two prompts, G = 4: group 1 rewards 1 0 0 1, group 2 all 2.
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])


def test_group_advantages_by_hand():
    # group 1: mean 0.5, Bessel std sqrt(4 * 0.25 / 3) = sqrt(1/3); group 2: centred to 0, std 0 -> 0 / 1e-4 = 0
    s = math.sqrt(1 / 3)
    want = torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]) / torch.tensor([s + 1e-4] * 4 + [1e-4] * 4)
    torch.testing.assert_close(group_advantages(REWARDS, 4), want)
    # batch: the same centring, one std over all 8 rewards: mean 1.25, squares 0.0625*2 + 1.5625*2 + 0.5625*4 = 5.5
    batch_std = math.sqrt(5.5 / 7)
    torch.testing.assert_close(group_advantages(REWARDS, 4, scale="batch"),
                               torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]) / (batch_std + 1e-4))
    torch.testing.assert_close(group_advantages(REWARDS, 4, scale="none"), torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))


def test_rloo_advantages_and_kl_shaped_rewards_by_hand():
    # completion 0: 1 - (0 + 0 + 1) / 3 = 2/3; completion 1: 0 - (1 + 0 + 1) / 3 = -2/3; group 2: 2 - 2 = 0
    torch.testing.assert_close(rloo_advantages(REWARDS, 4),
                               torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0]))
    # equal to G/(G-1) times the centred reward
    torch.testing.assert_close(rloo_advantages(REWARDS, 4), group_advantages(REWARDS, 4, scale="none") * 4 / 3)
    logps = torch.tensor([[-1.0, -2.0], [-0.5, -0.5]])
    ref = torch.tensor([[-1.5, -1.0], [-0.5, -3.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    # k1 sums over real tokens: (0.5 - 1.0) = -0.5 and 0 (the second token is masked); r - 0.1 * that
    torch.testing.assert_close(rloo_rewards(torch.tensor([1.0, 0.0]), logps, ref, mask, beta=0.1),
                               torch.tensor([1.05, 0.0]))


def test_kl_estimators_by_hand():
    logps, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -2.0])
    torch.testing.assert_close(kl_per_token(logps, ref, "k1"), torch.tensor([1.0, 0.0]))
    # k3 at ref - logp = -1: e^-1 + 1 - 1 = e^-1; equal log-probs: 0
    torch.testing.assert_close(kl_per_token(logps, ref, "k3"), torch.tensor([math.exp(-1), 0.0]))


def test_informative_groups_drop_groups_with_equal_rewards():
    assert informative_groups(REWARDS, 4).tolist() == [True, False]
    assert informative_groups(torch.tensor([0.0, 0.0, 1.0, 0.5]), 2).tolist() == [False, True]


# Two completions of two tokens; ratios 1.5, 0.5 | 1.0, (masked); advantages +1 | -1; epsilon 0.2.
RATIOS = torch.tensor([[1.5, 0.5], [1.0, 1.1]])
OLD = torch.tensor([[-1.0, -2.0], [-0.5, -0.7]])
MASK = torch.tensor([[1, 1], [1, 0]])
ADV = torch.tensor([1.0, -1.0])


def test_grpo_surrogate_and_aggregations_by_hand():
    logps = OLD + RATIOS.log()
    # seq 0 (A = +1): token 0 min(1.5, clip 1.2) = 1.2 -> -1.2; token 1 min(0.5, 0.8) = 0.5 -> -0.5
    # seq 1 (A = -1): token 0 ratio 1 -> +1; token 1 masked
    want = {"grpo": (-1.7 / 2 + 1.0) / 2, "bnpo": (-1.7 + 1.0) / 3, "dr_grpo": -0.7 / (2 * 4), "dapo": -0.7 / 10}
    for loss_type, value in want.items():
        loss, metrics = grpo_loss(logps, OLD, ADV, MASK, loss_type=loss_type, max_completion_length=4, num_items=10)
        assert loss.item() == pytest.approx(value, abs=1e-6), loss_type
    # clip-high: token 0 of seq 0 is clipped above with A > 0 (1 of 3 real tokens); nothing is clipped below with
    # A < 0 (token 1's ratio 0.5 is below 0.8, but its advantage is positive)
    assert metrics["clip_high"].item() == pytest.approx(1 / 3) and metrics["clip_low"].item() == 0
    # epsilon_high 0.6 lets token 0 count in full: (-1.5 - 0.5) / 2 = -1 for seq 0 -> grpo (-1 + 1) / 2 = 0
    loss, metrics = grpo_loss(logps, OLD, ADV, MASK, loss_type="grpo", epsilon_high=0.6)
    assert loss.item() == pytest.approx(0.0, abs=1e-6) and metrics["clip_high"].item() == 0
    # GSPO: seq 0's ratio is exp(mean(log 1.5, log 0.5)) = sqrt(0.75) (inside the clip range): -0.866; seq 1: +1
    loss, _ = grpo_loss(logps, OLD, ADV, MASK, loss_type="grpo", importance_sampling="sequence")
    assert loss.item() == pytest.approx((-math.sqrt(0.75) + 1.0) / 2, abs=1e-6)
    # k3 KL with ref - logp = -1 on every token adds beta * e^-1 to each real token
    loss, metrics = grpo_loss(logps, OLD, ADV, MASK, loss_type="bnpo", ref_logps=logps - 1.0, beta=0.1)
    assert loss.item() == pytest.approx((-0.7 + 3 * 0.1 * math.exp(-1)) / 3, abs=1e-6)
    assert metrics["kl"].item() == pytest.approx(math.exp(-1), abs=1e-6)


def test_grpo_gradient_by_hand():
    """d loss / d logp_t: 0 where the ratio is clipped; -A * ρ_t / (|o| * B) elsewhere (grpo aggregation)."""
    logps = (OLD + RATIOS.log()).requires_grad_()
    grpo_loss(logps, OLD, ADV, MASK, loss_type="grpo")[0].backward()
    # seq 0 token 0 clipped -> 0; token 1: -1 * 0.5 / (2 * 2); seq 1 token 0: +1 * 1 / (1 * 2); masked -> 0
    torch.testing.assert_close(logps.grad, torch.tensor([[0.0, -0.125], [0.5, 0.0]]))


@pytest.mark.parametrize("importance_sampling", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
def test_grpo_loss_equals_trls(loss_type, importance_sampling):
    g = torch.Generator().manual_seed(0)
    logps = torch.randn(8, 6, generator=g) * 0.3 - 1
    old = logps + torch.randn(8, 6, generator=g) * 0.2
    ref = logps + torch.randn(8, 6, generator=g) * 0.2
    mask = (torch.rand(8, 6, generator=g) > 0.3).long()
    advantages = group_advantages(torch.rand(8, generator=g), 4)
    for beta, eps_high in ((0.0, None), (0.04, 0.28)):
        kw = dict(ref_logps=ref, beta=beta, epsilon_low=0.2, epsilon_high=eps_high, importance_sampling=importance_sampling,
                  loss_type=loss_type, max_completion_length=6, num_items=40)
        ours = grpo_loss(logps.clone().requires_grad_(), old, advantages, mask, **kw)[0]
        theirs = oracles.trl_grpo_loss(logps, old, advantages, mask, **kw)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


def test_bad_input_is_refused_with_what_to_pass():
    with pytest.raises(ValueError, match="do not split into groups of 3"):
        group_advantages(REWARDS, 3)
    with pytest.raises(ValueError, match="group_size must be an integer >= 2"):
        rloo_advantages(REWARDS, 1)
    with pytest.raises(ValueError, match="scale must be one of"):
        group_advantages(REWARDS, 4, scale="std")
    logps = OLD + RATIOS.log()
    with pytest.raises(ValueError, match="beta > 0 needs ref_logps"):
        grpo_loss(logps, OLD, ADV, MASK, beta=0.1)
    with pytest.raises(ValueError, match="pass max_completion_length"):
        grpo_loss(logps, OLD, ADV, MASK, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="advantages must be"):
        grpo_loss(logps, OLD, ADV[:1], MASK)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        grpo_loss(logps, OLD, ADV, MASK, loss_type="ppo")
