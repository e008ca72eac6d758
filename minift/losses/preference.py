"""Preference-optimization losses: pure functions of tensors (torch only).

Every loss takes per-sequence *summed* completion log-probs ``logπ(y)`` of shape ``(B,)`` (prompt and
padding masked, EOS counted) and, where it length-normalizes, completion token counts ``n`` ``(B,)``.
It returns per-example losses ``(B,)`` (the caller reduces them: ``.mean()`` matches trl) plus
detached rewards for logging. Float16/bfloat16 inputs are computed in float32; float64 stays float64.

Notation: ``ρ = logπθ(y) − logπref(y)``, ``Δ = ρ_c − ρ_r``, ``ℓ = logπθ(y) / n``, σ the logistic
function, ε label smoothing. Semantics follow trl 1.16 except where a docstring says otherwise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
                  "apo_zero", "apo_down", "sigmoid_norm")
_SMOOTHED_TYPES = ("sigmoid", "robust", "exo_pair")  # the DPO loss types that read label_smoothing
_LENGTH_TYPES = ("ipo", "sigmoid_norm")  # the DPO loss types that need completion lengths


def _float(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 at least (half precision is upcast, float64 kept)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _check_logps(**tensors: torch.Tensor) -> None:
    """Raise ValueError unless every tensor is floating point and ``(B,)`` with the same B as the first."""
    first_name, first = next(iter(tensors.items()))
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor of summed completion log-probs, got {t!r:.80}")
        if t.dim() != 1 or t.shape != first.shape:
            raise ValueError(f"{name} must have shape (B,) = {tuple(first.shape)} like {first_name}, got "
                             f"{tuple(t.shape)}: pass one summed completion log-prob per sequence")


def _check_lengths(logps: torch.Tensor, loss: str, **lengths: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Completion token counts as float tensors shaped like ``logps``; ValueError if missing, misshaped or < 1."""
    out = {}
    for name, n in lengths.items():
        if n is None:
            raise ValueError(f"{loss} length-normalizes: pass chosen_lengths and rejected_lengths, the completion "
                             "token counts (B,) of each sequence (mask.sum(-1))")
        if not isinstance(n, torch.Tensor) or n.shape != logps.shape:
            raise ValueError(f"{name} must be a tensor of shape (B,) = {tuple(logps.shape)}, got "
                             f"{tuple(getattr(n, 'shape', ()))}")
        if bool((n < 1).any()):
            raise ValueError(f"{name} must be >= 1 (completion token counts), got min {n.min().item()}: "
                             "drop empty completions before the loss")
        out[name] = n.to(device=logps.device, dtype=logps.dtype)
    return out


def _check_beta(beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}: it scales the implicit reward (typical 0.1; 2.0 for SimPO)")


def _check_smoothing(label_smoothing: float) -> None:
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5) (the probability that a label is flipped), "
                         f"got {label_smoothing!r}")


def _smoothed_sigmoid(h: torch.Tensor, eps: float) -> torch.Tensor:
    """``−(1−ε)·logσ(h) − ε·logσ(−h)``: binary cross-entropy on logit h with target 1−ε."""
    loss = -F.logsigmoid(h)
    return loss if eps == 0 else (1 - eps) * loss - eps * F.logsigmoid(-h)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, *, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, chosen_lengths: torch.Tensor | None = None,
             rejected_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO and its variants, per pair. Rafailov et al. 2023, "Direct Preference Optimization" (arXiv 2305.18290).

    All inputs ``(B,)`` summed completion log-probs; lengths ``(B,)`` token counts (used by ipo and sigmoid_norm,
    ignored otherwise). Returns ``losses (B,)``, ``chosen_rewards = β·ρ_c`` and ``rejected_rewards = β·ρ_r``
    (detached). With ``h = βΔ``:

    - sigmoid: ``−(1−ε)logσ(h) − ε·logσ(−h)``; ε > 0 is conservative DPO (cDPO, Mitchell 2023). Note: trl 1.16's
      DPOTrainer ignores label_smoothing for sigmoid (it equals ours at ε = 0).
    - hinge: ``relu(1 − h)`` (SLiC, Zhao et al. 2023, arXiv 2305.10425).
    - ipo: ``(ρ_c/n_c − ρ_r/n_r − 1/(2β))²`` (Azar et al. 2023, arXiv 2310.12036; length-averaged as trl does).
    - robust: ``[−(1−ε)logσ(h) + ε·logσ(−h)] / (1−2ε)`` (rDPO, Chowdhury et al. 2024, arXiv 2403.00409).
    - exo_pair: ``σ(h)(logσ(h) − log(1−ε)) + σ(−h)(logσ(−h) − log ε)``, needs ε > 0, paper suggests 1e-3
      (Ji et al. 2024, arXiv 2402.00856).
    - nca_pair: ``−logσ(βρ_c) − ½logσ(−βρ_c) − ½logσ(−βρ_r)`` (Chen et al. 2024, arXiv 2402.05369).
    - bco_pair: ``−logσ(βρ_c) − logσ(−βρ_r)`` (Jung et al. 2024, arXiv 2404.04656). No reward shift δ: older
      trl subtracted a running mean of past batch rewards (state); trl 1.16 does not, nor does this pure function.
    - sppo_hard: ``(ρ_c − 1/(2β))² + (ρ_r + 1/(2β))²`` (Wu et al. 2024, arXiv 2405.00675, hard labels).
    - apo_zero: ``1 − σ(βρ_c) + σ(βρ_r)``; apo_down: ``σ(βρ_c) + 1 − σ(h)`` (D'Oosterlinck 2024, arXiv 2408.06266).
    - sigmoid_norm: ``−logσ(β(ρ_c/n_c − ρ_r/n_r))`` (length-normalized DPO).

    label_smoothing (ε in [0, 0.5)) is read by sigmoid, robust and exo_pair only; any other type raises rather
    than silently ignoring it (trl ignores it there). Add ``α·NLL(chosen)`` yourself for RPO.
    """
    _check_logps(policy_chosen=policy_chosen, policy_rejected=policy_rejected, ref_chosen=ref_chosen,
                 ref_rejected=ref_rejected)
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}: choose one of {', '.join(DPO_LOSS_TYPES)}")
    _check_beta(beta)
    _check_smoothing(label_smoothing)
    eps = label_smoothing
    if eps and loss_type not in _SMOOTHED_TYPES:
        raise ValueError(f"loss_type {loss_type!r} does not use label_smoothing: set it to 0.0, or pick one of "
                         f"{', '.join(_SMOOTHED_TYPES)}")
    if loss_type == "exo_pair" and eps == 0:
        raise ValueError("exo_pair needs label_smoothing > 0 (its ε; log ε is undefined at 0): the EXO paper "
                         "recommends 1e-3")
    rho_c = _float(policy_chosen) - _float(ref_chosen)
    rho_r = _float(policy_rejected) - _float(ref_rejected)
    h = beta * (rho_c - rho_r)
    if loss_type == "sigmoid":
        losses = _smoothed_sigmoid(h, eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - h)
    elif loss_type in _LENGTH_TYPES:
        n = _check_lengths(rho_c, loss_type, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
        delta = rho_c / n["chosen_lengths"] - rho_r / n["rejected_lengths"]
        losses = (delta - 1 / (2 * beta)) ** 2 if loss_type == "ipo" else -F.logsigmoid(beta * delta)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(h) + eps * F.logsigmoid(-h)) / (1 - 2 * eps)
    elif loss_type == "exo_pair":
        losses = (torch.sigmoid(h) * (F.logsigmoid(h) - math.log1p(-eps))
                  + torch.sigmoid(-h) * (F.logsigmoid(-h) - math.log(eps)))
    elif loss_type == "nca_pair":
        losses = -F.logsigmoid(beta * rho_c) - 0.5 * F.logsigmoid(-beta * rho_c) - 0.5 * F.logsigmoid(-beta * rho_r)
    elif loss_type == "bco_pair":
        losses = -F.logsigmoid(beta * rho_c) - F.logsigmoid(-beta * rho_r)
    elif loss_type == "sppo_hard":
        losses = (rho_c - 0.5 / beta) ** 2 + (rho_r + 0.5 / beta) ** 2
    elif loss_type == "apo_zero":
        losses = 1 - torch.sigmoid(beta * rho_c) + torch.sigmoid(beta * rho_r)
    else:  # apo_down
        losses = torch.sigmoid(beta * rho_c) + 1 - torch.sigmoid(h)
    return losses, beta * rho_c.detach(), beta * rho_r.detach()


def simpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, chosen_lengths: torch.Tensor,
               rejected_lengths: torch.Tensor, *, beta: float = 2.0, gamma: float = 0.5,
               label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO, reference-free and length-averaged. Meng et al. 2024, "SimPO" (arXiv 2405.14734).

    ``−(1−ε)logσ(β(ℓ_c − ℓ_r) − γ) − ε·logσ(−(β(ℓ_c − ℓ_r) − γ))`` with ``ℓ = logπθ(y)/n``.
    Inputs ``(B,)`` summed log-probs and token counts; returns ``losses (B,)`` and detached rewards ``β·ℓ``
    (as trl's CPOTrainer reports them). ``gamma`` is the margin γ itself, i.e. trl's ``simpo_gamma``: trl
    subtracts ``simpo_gamma/β`` from ``ℓ_c − ℓ_r`` before scaling by β, which is the same value.
    """
    _check_logps(policy_chosen=policy_chosen, policy_rejected=policy_rejected)
    _check_beta(beta)
    _check_smoothing(label_smoothing)
    pc, pr = _float(policy_chosen), _float(policy_rejected)
    n = _check_lengths(pc, "simpo_loss", chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    avg_c, avg_r = pc / n["chosen_lengths"], pr / n["rejected_lengths"]
    losses = _smoothed_sigmoid(beta * (avg_c - avg_r) - gamma, label_smoothing)
    return losses, beta * avg_c.detach(), beta * avg_r.detach()


def cpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, *, beta: float = 0.1,
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CPO's preference term, reference-free. Xu et al. 2024, "Contrastive Preference Optimization" (arXiv 2401.08417).

    ``−(1−ε)logσ(β(logπθ(y_c) − logπθ(y_r))) − ε·logσ(−β(…))`` on summed log-probs ``(B,)``. Returns
    ``losses (B,)`` and detached rewards ``β·logπθ(y)``. The full CPO objective is
    ``losses.mean() + α·NLL(chosen)``: the caller adds the chosen NLL (trl: token-mean CE over the chosen
    completions of the batch, α = ``cpo_alpha`` = 1.0).
    """
    _check_logps(policy_chosen=policy_chosen, policy_rejected=policy_rejected)
    _check_beta(beta)
    _check_smoothing(label_smoothing)
    pc, pr = _float(policy_chosen), _float(policy_rejected)
    return _smoothed_sigmoid(beta * (pc - pr), label_smoothing), beta * pc.detach(), beta * pr.detach()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 − eˣ)`` for x < 0 without cancellation: Mächler 2012, switching form at x = −log 2."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, chosen_lengths: torch.Tensor,
              rejected_lengths: torch.Tensor, *, beta: float = 0.1
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO per pair: ``−ℓ_c − β·logσ(log_odds)``. Hong et al. 2024, "ORPO" (arXiv 2403.07691).

    ``log_odds = (ℓ_c − ℓ_r) − (log(1 − e^ℓ_c) − log(1 − e^ℓ_r))`` with ``ℓ = logπθ(y)/n < 0``. Inputs ``(B,)``
    summed log-probs and token counts; returns ``losses (B,)``, detached rewards ``β·ℓ`` and detached
    ``log_odds (B,)``. trl's ORPOTrainer computes ``NLL − mean(β·logσ(log_odds))`` where its NLL is the
    token-mean CE over the whole batch's chosen prompt+completion tokens; ours is the per-pair completion
    mean ``−ℓ_c``. The odds-ratio term is identical; the NLL terms coincide when the batch's chosen
    completions have equal lengths and the prompt is masked. ℓ = 0 exactly (a fp-rounded certainty) is
    treated as ``−tiny`` in the odds so that gradients stay finite (trl yields NaN there).
    """
    _check_logps(policy_chosen=policy_chosen, policy_rejected=policy_rejected)
    _check_beta(beta)
    pc, pr = _float(policy_chosen), _float(policy_rejected)
    n = _check_lengths(pc, "orpo_loss", chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    if bool((pc > 0).any() | (pr > 0).any()):
        raise ValueError("orpo_loss got a positive log-prob: policy_chosen/policy_rejected must be summed "
                         "log-probabilities (<= 0), not losses or logits")
    avg_c, avg_r = pc / n["chosen_lengths"], pr / n["rejected_lengths"]
    below_zero = -torch.finfo(avg_c.dtype).tiny
    log_odds = (avg_c - avg_r) - (_log1mexp(avg_c.clamp(max=below_zero)) - _log1mexp(avg_r.clamp(max=below_zero)))
    losses = -avg_c - beta * F.logsigmoid(log_odds)
    return losses, beta * avg_c.detach(), beta * avg_r.detach(), log_odds.detach()


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor,
             kl_policy_logps: torch.Tensor | None = None, kl_ref_logps: torch.Tensor | None = None, *,
             beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
             kl: torch.Tensor | float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KTO, unpaired. Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization" (2402.01306).

    Desirable ``λ_D(1 − σ(β(ρ − z)))``, undesirable ``λ_U(1 − σ(β(z − ρ)))``, reference point
    ``z = max(0, mean(kl_policy_logps − kl_ref_logps))`` detached. policy/ref logps ``(B,)`` summed, desirable
    ``(B,)`` bool; kl_* ``(M,)`` summed log-probs of mismatched prompt/completion pairs. Returns ``losses (B,)``
    in input order (trl concatenates desirable first), detached rewards ``β·ρ (B,)`` and ``z`` (0-dim).
    z is the mean over *this* call's kl tensors; with several processes trl averages the gathered per-process
    means, so pass that value as ``kl`` (it overrides the kl_* tensors and is clamped at 0 here too).
    """
    _check_logps(policy_logps=policy_logps, ref_logps=ref_logps)
    _check_beta(beta)
    if not (desirable_weight >= 0 and undesirable_weight >= 0):
        raise ValueError(f"desirable_weight and undesirable_weight must be >= 0, got {desirable_weight!r}, "
                         f"{undesirable_weight!r}")
    if (not isinstance(desirable, torch.Tensor) or desirable.dtype != torch.bool
            or desirable.shape != policy_logps.shape):
        raise ValueError(f"desirable must be a bool tensor of shape (B,) = {tuple(policy_logps.shape)} "
                         f"(True for desirable completions), got {getattr(desirable, 'dtype', type(desirable))} "
                         f"{tuple(getattr(desirable, 'shape', ()))}")
    rho = _float(policy_logps) - _float(ref_logps)
    if kl is None:
        if kl_policy_logps is None or kl_ref_logps is None:
            raise ValueError("kto_loss needs the KL reference point: pass kl_policy_logps and kl_ref_logps (log-probs "
                             "of mismatched prompt/completion pairs) or kl (a precomputed, e.g. gathered, mean)")
        _check_logps(kl_policy_logps=kl_policy_logps, kl_ref_logps=kl_ref_logps)
        kl = (_float(kl_policy_logps) - _float(kl_ref_logps)).mean()
    z = torch.as_tensor(kl, dtype=rho.dtype, device=rho.device).detach().clamp(min=0)
    desirable = desirable.to(rho.device)
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (rho - z))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z - rho))))
    return losses, beta * rho.detach(), z


def reward_model_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, *, margin: torch.Tensor | None = None,
                      center_coefficient: float = 0.0) -> torch.Tensor:
    """Bradley-Terry reward-model loss (Ouyang et al. 2022, "Training language models to follow instructions",
    2203.02155): ``−log σ(s_c − s_r − m) + c (s_c + s_r)²`` per pair, for scalar scores ``s`` ``(B,)``; ``m`` an
    optional per-pair margin (Llama 2's), ``c`` centres the scores near 0 (Eisenstein et al. 2023). Returns
    ``(B,)`` as trl's RewardTrainer computes it before its mean."""
    if chosen_scores.shape != rejected_scores.shape or chosen_scores.dim() != 1:
        raise ValueError(f"chosen and rejected scores must both be (B,), got {tuple(chosen_scores.shape)} and "
                         f"{tuple(rejected_scores.shape)}")
    c, r = _float(chosen_scores), _float(rejected_scores)
    losses = -F.logsigmoid(c - r - (0 if margin is None else _float(margin)))
    return losses + center_coefficient * (c + r) ** 2 if center_coefficient else losses
