"""Preference losses: hand-derived values, trl 1.16 as an oracle, autograd gradients, and loud bad-input errors.

trl oracles used (no trainer is built; each is called on ``object.__new__(Trainer)`` with the attributes it reads):
- ``DPOTrainer._compute_loss`` with a stub model whose per-token log-probs sum to our inputs: every
  ``DPO_LOSS_TYPES`` entry (trl 1.16 has all 11), label smoothing for robust and exo_pair. trl 1.16's sigmoid
  ignores label_smoothing, so conservative DPO is checked against ``CPOTrainer.cpo_loss`` (sigmoid, ε > 0) instead,
  which is the same formula on reference-free log-ratios.
- ``trl.experimental.cpo.CPOTrainer.cpo_loss``: cpo (sigmoid) and simpo (``simpo_gamma``), with label smoothing.
- ``trl.experimental.orpo.ORPOTrainer.odds_ratio_loss``: ORPO's odds-ratio term (its NLL is a batch token-mean, ours
  per pair: compared term by term).
- ``KTOTrainer._compute_loss`` (trl.trainer) with a stub model and precomputed reference log-probs: kto.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from minift.losses import (
    DPO_LOSS_TYPES,
    cpo_loss,
    dpo_loss,
    kto_loss,
    orpo_loss,
    simpo_loss,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.kto_trainer import KTOTrainer

F64 = torch.float64


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def t64(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def close(actual: torch.Tensor, expected, rtol=1e-12, atol=1e-13):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=rtol, atol=atol)


# Two concrete pairs. ρ = policy − ref: ρ_c = (-5.0+5.5, -7.0+6.0) = (0.5, -1.0); ρ_r = (-6.0+5.0, -4.0+5.0)
# = (-1.0, 1.0); Δ = ρ_c − ρ_r = (1.5, -2.0). With β = 0.1: h = βΔ = (0.15, -0.2), βρ_c = (0.05, -0.1),
# βρ_r = (-0.1, 0.1). Lengths n_c = (4, 8), n_r = (2, 5).
PC, PR, RC, RR = t64(-5.0, -7.0), t64(-6.0, -4.0), t64(-5.5, -6.0), t64(-5.0, -5.0)
NC, NR = torch.tensor([4, 8]), torch.tensor([2, 5])
EPS = 0.1
HAND = {  # (loss_type, label_smoothing) -> per-pair losses derived by hand from the numbers above
    ("sigmoid", 0.0): [-logsig(0.15), -logsig(-0.2)],
    # cDPO: −(1−ε)logσ(h) − ε·logσ(−h)
    ("sigmoid", EPS): [-0.9 * logsig(0.15) - 0.1 * logsig(-0.15), -0.9 * logsig(-0.2) - 0.1 * logsig(0.2)],
    ("hinge", 0.0): [0.85, 1.2],  # relu(1 − h)
    # ρ_c/n_c = (0.125, -0.125), ρ_r/n_r = (-0.5, 0.2): d = (0.625, -0.325); 1/(2β) = 5
    ("ipo", 0.0): [(0.625 - 5) ** 2, (-0.325 - 5) ** 2],  # 19.140625, 28.355625
    ("robust", 0.0): [-logsig(0.15), -logsig(-0.2)],  # ε = 0: plain sigmoid
    ("robust", EPS): [(-0.9 * logsig(0.15) + 0.1 * logsig(-0.15)) / 0.8,
                      (-0.9 * logsig(-0.2) + 0.1 * logsig(0.2)) / 0.8],
    ("exo_pair", EPS): [sig(h) * (logsig(h) - math.log(0.9)) + sig(-h) * (logsig(-h) - math.log(0.1))
                        for h in (0.15, -0.2)],
    ("exo_pair", 1e-3): [sig(h) * (logsig(h) - math.log(0.999)) + sig(-h) * (logsig(-h) - math.log(1e-3))
                         for h in (0.15, -0.2)],
    ("nca_pair", 0.0): [-logsig(0.05) - 0.5 * logsig(-0.05) - 0.5 * logsig(0.1),
                        -logsig(-0.1) - 0.5 * logsig(0.1) - 0.5 * logsig(-0.1)],
    ("bco_pair", 0.0): [-logsig(0.05) - logsig(0.1), -logsig(-0.1) - logsig(-0.1)],
    ("sppo_hard", 0.0): [(0.5 - 5) ** 2 + (-1.0 + 5) ** 2, (-1.0 - 5) ** 2 + (1.0 + 5) ** 2],  # 36.25, 72.0
    ("apo_zero", 0.0): [1 - sig(0.05) + sig(-0.1), 1 - sig(-0.1) + sig(0.1)],
    ("apo_down", 0.0): [sig(0.05) + 1 - sig(0.15), sig(-0.1) + 1 - sig(-0.2)],
    ("sigmoid_norm", 0.0): [-logsig(0.1 * 0.625), -logsig(0.1 * -0.325)],
}


def test_hand_table_covers_every_dpo_loss_type():
    assert {t for t, _ in HAND} == set(DPO_LOSS_TYPES)


@pytest.mark.parametrize("loss_type,eps", list(HAND))
def test_dpo_loss_equals_hand_derivation(loss_type, eps):
    losses, chosen_rewards, rejected_rewards = dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type=loss_type,
                                                        label_smoothing=eps, chosen_lengths=NC, rejected_lengths=NR)
    close(losses, HAND[loss_type, eps])
    close(chosen_rewards, [0.05, -0.1])  # β·ρ_c, whatever the loss type
    close(rejected_rewards, [-0.1, 0.1])
    # float32 inputs give float32 losses at float32 precision
    losses32, _, _ = dpo_loss(PC.float(), PR.float(), RC.float(), RR.float(), beta=0.1, loss_type=loss_type,
                              label_smoothing=eps, chosen_lengths=NC, rejected_lengths=NR)
    assert losses32.dtype == torch.float32
    close(losses32, HAND[loss_type, eps], rtol=1e-6, atol=1e-6)


def test_dpo_rewards_are_detached_and_losses_carry_gradient():
    pc = PC.clone().requires_grad_()
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, PR, RC, RR)
    assert losses.requires_grad and not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


def test_simpo_equals_hand_derivation():
    # ℓ_c = (-5/4, -7/8) = (-1.25, -0.875); ℓ_r = (-6/2, -4/5) = (-3.0, -0.8)
    # β(ℓ_c − ℓ_r) − γ with β = 2, γ = 0.5: 2·1.75 − 0.5 = 3.0; 2·(−0.075) − 0.5 = −0.65
    losses, chosen_rewards, rejected_rewards = simpo_loss(PC, PR, NC, NR, beta=2.0, gamma=0.5)
    close(losses, [-logsig(3.0), -logsig(-0.65)])
    close(chosen_rewards, [-2.5, -1.75])  # β·ℓ_c
    close(rejected_rewards, [-6.0, -1.6])
    smoothed, _, _ = simpo_loss(PC, PR, NC, NR, beta=2.0, gamma=0.5, label_smoothing=EPS)
    close(smoothed, [-0.9 * logsig(3.0) - 0.1 * logsig(-3.0), -0.9 * logsig(-0.65) - 0.1 * logsig(0.65)])


def test_cpo_equals_hand_derivation():
    # logπ_c − logπ_r = (1.0, -3.0); β = 0.1: h = (0.1, -0.3)
    losses, chosen_rewards, rejected_rewards = cpo_loss(PC, PR, beta=0.1)
    close(losses, [-logsig(0.1), -logsig(-0.3)])
    close(chosen_rewards, [-0.5, -0.7])
    close(rejected_rewards, [-0.6, -0.4])
    smoothed, _, _ = cpo_loss(PC, PR, beta=0.1, label_smoothing=EPS)
    close(smoothed, [-0.9 * logsig(0.1) - 0.1 * logsig(-0.1), -0.9 * logsig(-0.3) - 0.1 * logsig(0.3)])


def test_orpo_equals_hand_derivation():
    # ℓ_c = (-1.25, -0.875), ℓ_r = (-3.0, -0.8); log_odds = (ℓ_c − ℓ_r) − (log(1 − e^ℓ_c) − log(1 − e^ℓ_r))
    lo = [1.75 - (math.log(1 - math.exp(-1.25)) - math.log(1 - math.exp(-3.0))),
          -0.075 - (math.log(1 - math.exp(-0.875)) - math.log(1 - math.exp(-0.8)))]
    losses, chosen_rewards, rejected_rewards, log_odds = orpo_loss(PC, PR, NC, NR, beta=0.1)
    close(log_odds, lo)
    close(losses, [1.25 - 0.1 * logsig(lo[0]), 0.875 - 0.1 * logsig(lo[1])])  # NLL_c = −ℓ_c
    close(chosen_rewards, [-0.125, -0.0875])
    close(rejected_rewards, [-0.3, -0.08])


def test_orpo_log1mexp_is_stable_near_zero_and_far_below():
    # log(1 − e^x) for x = −1e-7 is log(1e-7 − 5e-15 + …) ≈ −16.118; float32 1 − exp(−1e-7) rounds to 1.19e-7.
    # One token each, so ℓ = the log-prob itself.
    for chosen, rejected in ((-1e-7, -30.0), (-30.0, -1e-7), (-0.6931, -0.6932)):
        expected = (chosen - rejected) - (math.log(-math.expm1(chosen)) - math.log(-math.expm1(rejected)))
        *_, log_odds = orpo_loss(torch.tensor([chosen]), torch.tensor([rejected]), torch.tensor([1]), torch.tensor([1]))
        close(log_odds, [expected], rtol=1e-6, atol=1e-5)
    # ℓ = 0 exactly (a rounded certainty) keeps the loss and its gradient finite
    pc = torch.tensor([0.0, -2.0], requires_grad=True)
    losses, *_ = orpo_loss(pc, torch.tensor([-1.0, -3.0]), torch.tensor([3, 3]), torch.tensor([3, 3]))
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(pc.grad).all()


# KTO: four unpaired examples. ρ = policy − ref = (0.5, -1.0, -1.0, 1.0), desirable = (T, F, T, F).
# KL pairs: kl_policy − kl_ref = (0.3, 0.6, 0.3), mean z = 0.4.
KP, KR, KD = t64(-5.0, -7.0, -6.0, -4.0), t64(-5.5, -6.0, -5.0, -5.0), torch.tensor([True, False, True, False])
KLP, KLR = t64(-3.0, -4.0, -2.0), t64(-3.3, -4.6, -2.3)


def test_kto_equals_hand_derivation():
    # desirable 1 − σ(β(ρ − z)), undesirable 1 − σ(β(z − ρ)), β = 0.1, z = 0.4:
    # β(ρ−z) = 0.01 and -0.14 for the desirable ones; β(z−ρ) = 0.14 and -0.06 for the undesirable ones
    losses, rewards, z = kto_loss(KP, KR, KD, KLP, KLR, beta=0.1)
    close(z, 0.4)
    close(losses, [1 - sig(0.01), 1 - sig(0.14), 1 - sig(-0.14), 1 - sig(-0.06)])
    close(rewards, [0.05, -0.1, -0.1, 0.1])
    weighted, _, _ = kto_loss(KP, KR, KD, KLP, KLR, beta=0.1, desirable_weight=1.5, undesirable_weight=0.5)
    close(weighted, [1.5 * (1 - sig(0.01)), 0.5 * (1 - sig(0.14)), 1.5 * (1 - sig(-0.14)), 0.5 * (1 - sig(-0.06))])


def test_kto_reference_point_clamps_at_zero_and_accepts_an_override():
    # kl_policy − kl_ref = (-1.0, -0.5): mean -0.75 -> z = max(0, -0.75) = 0, so desirable 1 − σ(βρ) with
    # βρ = 0.05, -0.1 and undesirable 1 − σ(−βρ) with −βρ = 0.1, -0.1
    zero_losses = [1 - sig(0.05), 1 - sig(0.1), 1 - sig(-0.1), 1 - sig(-0.1)]
    losses, _, z = kto_loss(KP, KR, KD, t64(-3.0, -4.0), t64(-2.0, -3.5), beta=0.1)
    assert z.item() == 0.0
    close(losses, zero_losses)
    # an explicit (e.g. gathered) kl wins over the tensors and is clamped too
    over, _, z = kto_loss(KP, KR, KD, t64(-3.0, -4.0), t64(-2.0, -3.5), beta=0.1, kl=0.4)
    close(z, 0.4)
    close(over, [1 - sig(0.01), 1 - sig(0.14), 1 - sig(-0.14), 1 - sig(-0.06)])
    neg, _, z = kto_loss(KP, KR, KD, beta=0.1, kl=torch.tensor(-0.2, dtype=F64))
    assert z.item() == 0.0
    close(neg, zero_losses)


def test_kto_reference_point_is_detached():
    klp = KLP.clone().requires_grad_()
    kp = KP.clone().requires_grad_()
    losses, _, z = kto_loss(kp, KR, KD, klp, KLR)
    losses.sum().backward()
    assert klp.grad is None and not z.requires_grad and kp.grad is not None


# ---------------------------------------------------------------- trl 1.16 oracles

def _random_batch(seed, b=5):
    g = torch.Generator().manual_seed(seed)
    logps = [-(1 + 29 * torch.rand(b, generator=g, dtype=F64)) for _ in range(4)]
    lengths = [torch.randint(1, 13, (b,), generator=g) for _ in range(2)]
    return logps, lengths


class _StubLM:
    """Stands in for the model in trl's ``_compute_loss``: row i's per-token log-probs sum to ``logps[i]``."""

    training = True

    def __init__(self, logps):
        self.logps = logps

    def __call__(self, input_ids, **kwargs):
        n, width = input_ids.shape[0], input_ids.shape[1] - 1
        log_probs = torch.zeros(n, width, dtype=self.logps.dtype)
        log_probs[:, 0] = self.logps  # trl sums every position (the fused head leaves 0 where labels are -100)
        return SimpleNamespace(log_probs=log_probs, entropy=torch.zeros(n, width), mean_logits=torch.zeros(n, width),
                               is_top1=torch.zeros(n, width, dtype=torch.bool))


def _token_batch(lengths):
    """input_ids / attention_mask / completion_mask for sequences of one prompt token then ``lengths[i]`` tokens."""
    width = 1 + int(lengths.max())
    completion_mask = (torch.arange(width) >= 1) & (torch.arange(width) <= lengths[:, None])
    return {"input_ids": torch.ones(len(lengths), width, dtype=torch.long), "attention_mask": completion_mask.long(),
            "completion_mask": completion_mask.long()}


def _stub_trainer(cls, model, **attrs):
    trainer = object.__new__(cls)
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t)
    trainer.__dict__.update(model=model, accelerator=accelerator, aux_loss_enabled=False, _tp_size=1,
                            _total_train_tokens=0, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
                            **attrs)
    return trainer


def _trl_dpo_pair(loss_type, eps, beta, pc, pr, rc, rr, nc, nr):
    """trl's DPO loss and rewards for a single pair (its _compute_loss returns the batch mean)."""
    model = _StubLM(torch.stack([pc, pr]))
    trainer = _stub_trainer(DPOTrainer, model, beta=beta, loss_types=[loss_type], loss_weights=[1.0],
                            label_smoothing=eps, ld_alpha=None, precompute_ref_logps=True,
                            f_divergence_type="reverse_kl", use_weighting=False)
    inputs = _token_batch(torch.stack([nc, nr])) | {"ref_chosen_logps": rc[None], "ref_rejected_logps": rr[None]}
    loss = trainer._compute_loss(model, inputs, return_outputs=False)
    metrics = trainer._metrics["train"]
    return loss.item(), metrics["rewards/chosen"][-1], metrics["rewards/rejected"][-1]


@pytest.mark.parametrize("beta", [0.1, 0.7])
@pytest.mark.parametrize("loss_type,eps", [(t, 0.0) for t in DPO_LOSS_TYPES if t != "exo_pair"]
                         + [("robust", 0.2), ("exo_pair", 1e-3), ("exo_pair", 0.25)])
def test_dpo_loss_equals_trl(loss_type, eps, beta):
    (pc, pr, rc, rr), (nc, nr) = _random_batch(seed=len(loss_type))
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type,
                                                        label_smoothing=eps, chosen_lengths=nc, rejected_lengths=nr)
    expected = [_trl_dpo_pair(loss_type, eps, beta, *(t[i] for t in (pc, pr, rc, rr, nc, nr))) for i in range(len(pc))]
    # trl builds exo_pair's ε as a float32 tensor, so its log ε and log(1−ε) carry float32 rounding (~1e-8)
    tol = dict(rtol=1e-6, atol=1e-7) if loss_type == "exo_pair" else {}
    close(losses, [e[0] for e in expected], **tol)
    close(chosen_rewards, [e[1] for e in expected])
    close(rejected_rewards, [e[2] for e in expected])


def _trl_cpo(loss_type, beta, eps, chosen, rejected, simpo_gamma=0.5):
    trainer = _stub_trainer(CPOTrainer, None, beta=beta, label_smoothing=eps, loss_type=loss_type, alpha=0.0,
                            simpo_gamma=simpo_gamma)
    return trainer.cpo_loss(chosen, rejected)


@pytest.mark.parametrize("eps", [0.0, 0.15])
def test_cpo_simpo_and_conservative_dpo_equal_trl(eps):
    (pc, pr, rc, rr), (nc, nr) = _random_batch(seed=1)
    for ours, theirs in [(cpo_loss(pc, pr, beta=0.3, label_smoothing=eps), _trl_cpo("sigmoid", 0.3, eps, pc, pr)),
                         # trl's CPO trainer feeds SimPO length-averaged log-probs; its simpo_gamma is our gamma
                         (simpo_loss(pc, pr, nc, nr, beta=2.5, gamma=0.8, label_smoothing=eps),
                          _trl_cpo("simpo", 2.5, eps, pc / nc, pr / nr, simpo_gamma=0.8)),
                         # cDPO: trl's DPO sigmoid ignores label_smoothing; with zero log-ratio reference terms it
                         # is CPO's smoothed sigmoid
                         (dpo_loss(pc + rc, pr + rr, rc, rr, beta=0.3, label_smoothing=eps)[:1],
                          _trl_cpo("sigmoid", 0.3, eps, pc, pr)[:1])]:
        for a, b in zip(ours, theirs, strict=True):
            close(a, b)


def test_orpo_equals_trl():
    (pc, pr, _, _), (nc, nr) = _random_batch(seed=2)
    pc, pr = pc.float() / 10, pr.float() / 10  # trl computes the odds ratio in float32; include ℓ > −log 2
    trainer = _stub_trainer(ORPOTrainer, None, beta=0.25)
    trl_losses, trl_chosen, trl_rejected, trl_mean_ratio, trl_mean_log_odds = trainer.odds_ratio_loss(pc / nc, pr / nr)
    losses, chosen_rewards, rejected_rewards, log_odds = orpo_loss(pc, pr, nc, nr, beta=0.25)
    # trl's loss = NLL − mean(β·logσ(log_odds)): compare the odds-ratio term per pair, with our NLL_c = −ℓ_c removed
    close(losses - (-pc / nc), -trl_losses, rtol=1e-6, atol=1e-6)
    close(chosen_rewards, trl_chosen, rtol=1e-6, atol=1e-6)
    close(rejected_rewards, trl_rejected, rtol=1e-6, atol=1e-6)
    close(log_odds.mean(), trl_mean_log_odds, rtol=1e-6, atol=1e-6)


def _trl_kto_example(policy, ref, desirable, kl_policy, kl_ref, beta, wd, wu):
    """trl's KTO loss for one example (its _compute_loss returns the nanmean), and its logged kl."""
    model = _StubLM(policy[None])
    trainer = _stub_trainer(KTOTrainer, model, beta=beta, loss_type="kto", desirable_weight=wd, undesirable_weight=wu,
                            calculate_KL=True, precompute_ref_logps=True)
    trainer._compute_kl_logps = lambda model, batch: kl_policy
    inputs = _token_batch(torch.tensor([3])) | {"label": desirable[None], "ref_logps": ref[None],
                                                "ref_KL_logps": kl_ref}
    loss = trainer._compute_loss(model, inputs, return_outputs=False)
    return loss.item(), trainer._metrics["train"]["kl"][-1]


@pytest.mark.parametrize("kl_shift", [0.0, 2.0])  # 2.0 pushes the batch KL below 0: trl's clamp must match ours
def test_kto_equals_trl(kl_shift):
    (policy, ref, kl_policy, kl_ref), _ = _random_batch(seed=3, b=6)
    kl_ref = kl_policy - 0.3 * torch.rand(6, generator=torch.Generator().manual_seed(4), dtype=F64) + kl_shift
    desirable = torch.tensor([True, False, False, True, True, False])
    losses, _, z = kto_loss(policy, ref, desirable, kl_policy, kl_ref, beta=0.2, desirable_weight=1.3,
                            undesirable_weight=0.7)
    expected = [_trl_kto_example(policy[i], ref[i], desirable[i], kl_policy, kl_ref, 0.2, 1.3, 0.7) for i in range(6)]
    close(losses, [e[0] for e in expected])
    close(z, expected[0][1])
    assert (z.item() == 0.0) == (kl_shift > 0)


# ---------------------------------------------------------------- gradients

@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.1), ("ipo", 0.0), ("robust", 0.2), ("exo_pair", 1e-3),
                                           ("nca_pair", 0.0), ("bco_pair", 0.0), ("sppo_hard", 0.0),
                                           ("apo_down", 0.0), ("sigmoid_norm", 0.0)])
def test_dpo_gradcheck(loss_type, eps):
    (pc, pr, rc, rr), (nc, nr) = _random_batch(seed=5, b=3)
    inputs = tuple(t.clone().requires_grad_() for t in (pc / 10, pr / 10, rc / 10, rr / 10))
    assert torch.autograd.gradcheck(lambda *x: dpo_loss(*x, beta=0.5, loss_type=loss_type, label_smoothing=eps,
                                                        chosen_lengths=nc, rejected_lengths=nr)[0], inputs)


def test_simpo_orpo_kto_gradcheck():
    (pc, pr, rc, rr), (nc, nr) = _random_batch(seed=6, b=3)
    pair = (pc.clone().requires_grad_(), pr.clone().requires_grad_())
    assert torch.autograd.gradcheck(lambda c, r: simpo_loss(c, r, nc, nr, beta=2.0, gamma=0.5)[0], pair)
    assert torch.autograd.gradcheck(lambda c, r: cpo_loss(c / 10, r / 10, label_smoothing=0.1)[0], pair)
    assert torch.autograd.gradcheck(lambda c, r: orpo_loss(c / 10, r / 10, nc, nr, beta=0.3)[0], pair)
    desirable = torch.tensor([True, False, True])
    assert torch.autograd.gradcheck(
        lambda p, r: kto_loss(p, r, desirable, KLP, KLR, beta=0.3, desirable_weight=1.5)[0], pair)


# ---------------------------------------------------------------- bad input

def test_bad_inputs_raise_with_the_fix():
    with pytest.raises(ValueError, match="choose one of sigmoid, hinge, ipo"):
        dpo_loss(PC, PR, RC, RR, loss_type="dpo")
    for loss_type in ("ipo", "sigmoid_norm"):
        with pytest.raises(ValueError, match="pass chosen_lengths and rejected_lengths"):
            dpo_loss(PC, PR, RC, RR, loss_type=loss_type, chosen_lengths=NC)
    with pytest.raises(ValueError, match=r"ref_rejected must have shape \(B,\) = \(2,\)"):
        dpo_loss(PC, PR, RC, t64(-1.0, -2.0, -3.0))
    with pytest.raises(ValueError, match=r"policy_chosen must have shape \(B,\)"):
        cpo_loss(PC[:, None], PR[:, None])
    with pytest.raises(ValueError, match=r"chosen_lengths must be a tensor of shape \(B,\) = \(2,\)"):
        simpo_loss(PC, PR, torch.tensor([4]), NR)
    with pytest.raises(ValueError, match="must be >= 1.*drop empty completions"):
        dpo_loss(PC, PR, RC, RR, loss_type="ipo", chosen_lengths=torch.tensor([0, 3]), rejected_lengths=NR)
    for beta in (0.0, -0.1, float("nan")):
        for call in (lambda: dpo_loss(PC, PR, RC, RR, beta=beta), lambda: simpo_loss(PC, PR, NC, NR, beta=beta),
                     lambda: cpo_loss(PC, PR, beta=beta), lambda: orpo_loss(PC, PR, NC, NR, beta=beta),
                     lambda: kto_loss(KP, KR, KD, KLP, KLR, beta=beta)):
            with pytest.raises(ValueError, match="beta must be > 0"):
                call()
    for eps in (-0.1, 0.5):
        with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0, 0.5\)"):
            dpo_loss(PC, PR, RC, RR, label_smoothing=eps)
    with pytest.raises(ValueError, match="'hinge' does not use label_smoothing: set it to 0.0"):
        dpo_loss(PC, PR, RC, RR, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="exo_pair needs label_smoothing > 0.*1e-3"):
        dpo_loss(PC, PR, RC, RR, loss_type="exo_pair")
    with pytest.raises(ValueError, match="positive log-prob"):
        orpo_loss(t64(0.5, -1.0), PR, NC, NR)
    with pytest.raises(ValueError, match="pass kl_policy_logps and kl_ref_logps .* or kl"):
        kto_loss(KP, KR, KD)
    with pytest.raises(ValueError, match="desirable must be a bool tensor"):
        kto_loss(KP, KR, KD.long(), KLP, KLR)
    with pytest.raises(ValueError, match="floating-point tensor"):
        dpo_loss(PC.long(), PR, RC, RR)
