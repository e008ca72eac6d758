"""Policy-gradient losses for online RL from sampled completions: pure functions of tensors (torch only).

Completions come in groups: the G completions of one prompt are contiguous (prompt-major, as
:func:`minift.train.sampling.sample` returns them), so ``rewards`` ``(B,)`` with ``B = prompts x G``.
Per-token tensors are ``(B, T)`` over completion tokens, with ``mask`` ``(B, T)`` 1 on real tokens.

Notation: ``ρ_t = π(o_t) / π_old(o_t)`` the importance ratio, ``A`` an advantage, ``ε_low`` / ``ε_high`` the
clip range, ``β`` the KL coefficient, ``|o|`` a completion's length. Semantics follow trl 1.16's GRPOTrainer
(the loss equals its ``_compute_loss`` on the same inputs; tests/test_policy_losses.py checks it).
"""

from __future__ import annotations

import torch

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
ADVANTAGE_SCALES = ("group", "batch", "none")
KL_ESTIMATORS = ("k1", "k3")


def _groups(rewards: torch.Tensor, group_size: int, *, least: int = 1) -> torch.Tensor:
    """``rewards`` ``(B,)`` as ``(B / G, G)``, checked."""
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1 or not rewards.is_floating_point():
        raise ValueError(f"rewards must be a 1-D floating-point tensor (one per completion), got {rewards!r:.80}")
    if not isinstance(group_size, int) or group_size < least:
        raise ValueError(f"group_size must be an integer >= {least} (completions per prompt), got {group_size!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}: pass every completion "
                         f"of each prompt, prompt-major")
    return rewards.view(-1, group_size)


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: str = "group",
                     eps: float = 1e-4) -> torch.Tensor:
    """GRPO advantages. Shao et al. 2024, "DeepSeekMath" (2402.03300); ``scale="none"``: Liu et al. 2025,
    "Understanding R1-Zero-Like Training" (Dr. GRPO, 2503.20783).

    ``A_i = (r_i − mean_g r) / (std + eps)``; std (Bessel-corrected) of the group (``group``), of the whole batch
    (``batch``), or no division (``none``). Returns ``(B,)``; a group whose rewards are all equal gets zeros.
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
    groups = _groups(rewards, group_size, least=1 if scale == "none" else 2)
    centred = (groups - groups.mean(dim=1, keepdim=True)).reshape(-1)
    if scale == "none":
        return centred
    if scale == "group":
        std = groups.std(dim=1).repeat_interleave(group_size)
    else:
        std = rewards.std().expand_as(rewards)
    return centred / (std + eps)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out advantages. Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style
    Optimization for Learning from Human Feedback in LLMs" (2402.14740); Kool et al. 2019.

    ``A_i = r_i − (Σ_g r_j − r_i) / (G − 1)``: each completion's baseline is the mean of its group's others.
    Returns ``(B,)``.
    """
    groups = _groups(rewards, group_size, least=2)
    others = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others).reshape(-1)


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """DAPO's dynamic-sampling filter (Yu et al. 2025, 2503.14476): ``(B / G,)`` bool, False for a group whose
    rewards are all equal (its advantages are all zero: it teaches nothing)."""
    groups = _groups(rewards, group_size)
    return (groups != groups[:, :1]).any(dim=1)


def kl_per_token(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimates of KL(π ‖ π_ref) from samples of π (Schulman 2020, "Approximating KL Divergence").

    ``k1 = logπ − logπ_ref``; ``k3 = e^{logπ_ref − logπ} − (logπ_ref − logπ) − 1`` (non-negative, unbiased).
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    if logps.shape != ref_logps.shape:
        raise ValueError(f"logps {tuple(logps.shape)} and ref_logps {tuple(ref_logps.shape)} must have the same shape")
    delta = ref_logps - logps
    return -delta if estimator == "k1" else torch.exp(delta) - delta - 1


def rloo_rewards(rewards: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor, *,
                 beta: float) -> torch.Tensor:
    """RLOO's KL-shaped reward (Ahmadian et al. 2024): ``r − β · Σ_t (logπ_old − logπ_ref)``, detached (the KL
    enters through the advantages, not as a loss term). ``logps``: the sampling policy's per-token log-probs."""
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta!r}")
    kl = (kl_per_token(logps, ref_logps, "k1") * mask).sum(dim=1)
    return (rewards - beta * kl).detach()


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              ref_logps: torch.Tensor | None = None, beta: float = 0.0, epsilon_low: float = 0.2,
              epsilon_high: float | None = None, importance_sampling: str = "token", loss_type: str = "dapo",
              kl_estimator: str = "k3", max_completion_length: int | None = None,
              num_items: float | torch.Tensor | None = None, weights: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate of GRPO (Shao et al. 2024, 2402.03300) and its variants.

    Per token ``ℓ_t = −min(ρ A, clip(ρ, 1 − ε_low, 1 + ε_high) A) + β · KL_t`` (DAPO's clip-higher when
    ``ε_high > ε_low``, Yu et al. 2025, 2503.14476). ``importance_sampling="sequence"`` uses one ratio per
    completion, ``ρ = exp(mean_t log ρ_t)`` (GSPO, Zheng et al. 2025, 2507.18071). Aggregation ``loss_type``:
    ``grpo`` mean over each completion's tokens then over completions; ``bnpo`` sum / tokens here; ``dr_grpo``
    sum / (B · max_completion_length) (Dr. GRPO); ``dapo`` sum / ``num_items`` (default: tokens here; pass the
    whole batch's token count over the number of processes when the batch is split across steps or processes).

    ``logps`` ``(B, T)`` with grad; ``old_logps`` the sampling policy's (detached; equal to ``logps`` on the first
    pass over fresh rollouts, so ``ρ = 1``); ``advantages`` ``(B,)``; ``ref_logps`` needed when ``beta > 0``;
    ``weights`` ``(B, T)``, detached: per-token factors of the surrogate (importance weights to the policy that
    really sampled, when another engine did: :func:`~minift.train.remote.tis_weights`).
    Returns the loss and detached metrics: ``clip_low`` / ``clip_high`` (share of tokens whose ratio is clipped
    below with ``A < 0`` / above with ``A > 0``) and ``kl`` (mean over tokens, when ``beta > 0``).
    """
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {GRPO_LOSS_TYPES}, got {loss_type!r}")
    if importance_sampling not in ("token", "sequence"):
        raise ValueError(f"importance_sampling must be 'token' or 'sequence' (GSPO), got {importance_sampling!r}")
    if not (epsilon_low >= 0 and epsilon_high >= 0 and beta >= 0):
        raise ValueError(f"epsilon_low, epsilon_high and beta must be >= 0, got {epsilon_low}, {epsilon_high}, {beta}")
    if logps.dim() != 2 or old_logps.shape != logps.shape or mask.shape != logps.shape:
        raise ValueError(f"logps, old_logps and mask must share one (B, T) shape, got {tuple(logps.shape)}, "
                         f"{tuple(old_logps.shape)}, {tuple(mask.shape)}")
    if advantages.shape != logps.shape[:1]:
        raise ValueError(f"advantages must be (B,) = ({logps.shape[0]},), one per completion, got "
                         f"{tuple(advantages.shape)}")
    if beta > 0 and ref_logps is None:
        raise ValueError("beta > 0 needs ref_logps (the reference model's per-token log-probs)")
    if loss_type == "dr_grpo" and not max_completion_length:
        raise ValueError("loss_type 'dr_grpo' divides by B x max_completion_length: pass max_completion_length")
    mask = mask.to(logps.dtype)
    lengths = mask.sum(dim=1).clamp(min=1.0)
    log_ratio = logps - old_logps.detach()
    if importance_sampling == "sequence":
        log_ratio = ((log_ratio * mask).sum(dim=1) / lengths).unsqueeze(1)
    ratio = torch.exp(log_ratio)
    adv = advantages.to(logps.dtype).unsqueeze(1)
    per_token = -torch.min(ratio * adv, ratio.clamp(1 - epsilon_low, 1 + epsilon_high) * adv)
    if weights is not None:
        per_token = per_token * weights.detach()
    metrics: dict[str, torch.Tensor] = {}
    if beta > 0:
        kl = kl_per_token(logps, ref_logps, kl_estimator)
        per_token = per_token + beta * kl
        metrics["kl"] = ((kl * mask).sum() / mask.sum().clamp(min=1.0)).detach()
    per_token = per_token * mask
    if loss_type == "grpo":
        loss = (per_token.sum(dim=1) / lengths).mean()
    elif loss_type == "bnpo":
        loss = per_token.sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = per_token.sum() / (logps.shape[0] * max_completion_length)
    else:
        loss = per_token.sum() / (mask.sum().clamp(min=1.0) if num_items is None else num_items)
    tokens = mask.sum().clamp(min=1.0)
    metrics["clip_low"] = ((((ratio < 1 - epsilon_low) & (adv < 0)) * mask).sum() / tokens).detach()
    metrics["clip_high"] = ((((ratio > 1 + epsilon_high) & (adv > 0)) * mask).sum() / tokens).detach()
    return loss, metrics
