"""PPO for language models with a learned value function: pure functions of tensors (torch only).

Per-token tensors are ``(B, T)`` over completion tokens with ``mask`` ``(B, T)`` 1 on real tokens (a row's real
tokens come first: completions are right-padded). Formulas follow Ziegler et al. 2019, "Fine-Tuning Language
Models from Human Preferences" (1909.08593; KL-penalized rewards, the adaptive KL controller), Schulman et al.
2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation" (1506.02438; GAE) and
Schulman et al. 2017, "Proximal Policy Optimization Algorithms" (1707.06347; the clipped losses).
"""

from __future__ import annotations

import math

import torch


def _check(mask: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
    for t in tensors:
        if t.shape != mask.shape:
            raise ValueError(f"per-token tensors must all have the mask's shape {tuple(mask.shape)}, got "
                             f"{tuple(t.shape)}")
    return mask.to(tensors[0].dtype if tensors else torch.float32)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1."""
    m = _check(mask, x)
    return (x * m).sum() / m.sum().clamp(min=1)


def masked_moments(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[count, Σx, Σx²]`` (float64) over the masked positions: summed over processes, they whiten a batch split
    across processes as one (:func:`masked_whiten`'s ``moments``)."""
    m = _check(mask, x).double()
    x = x.double() * m
    return torch.stack([m.sum(), x.sum(), (x * x).sum()])


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8,
                  moments: torch.Tensor | None = None) -> torch.Tensor:
    """``(x − μ) / sqrt(σ² + eps)`` with μ and the Bessel-corrected σ² over masked positions (``shift_mean=False``
    adds μ back: only the scale changes, as for rewards). ``moments``: :func:`masked_moments` of the whole batch
    (e.g. summed over processes); default this tensor's. Positions outside the mask are returned as 0."""
    m = _check(mask, x)
    n, total, squares = (masked_moments(x, mask) if moments is None else moments).tolist()
    if n < 2:
        raise ValueError("whitening needs at least 2 masked positions")
    mean = total / n
    var = max(squares - total * mean, 0.0) / (n - 1)
    out = (x - mean) / math.sqrt(var + eps)
    return (out if shift_mean else out + mean) * m


def kl_penalized_rewards(scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor,
                         kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards ``r_t = −β (log π(o_t) − log π_ref(o_t))``, plus the sequence's score at its last real
    token (the last masked position: a row may start with masked prompt positions). Returns ``(rewards (B, T),
    kl (B, T))``; ``kl`` is the per-token k1 estimate (0 outside the mask)."""
    m = _check(mask, logps, ref_logps)
    if scores.shape != (mask.shape[0],):
        raise ValueError(f"scores must be (B,) = ({mask.shape[0]},), got {tuple(scores.shape)}")
    real = mask.bool()
    if not real.any(dim=1).all():
        raise ValueError("every completion needs at least one token")
    last = mask.shape[1] - 1 - real.flip(1).int().argmax(dim=1)
    kl = (logps - ref_logps) * m
    rewards = -kl_coef * kl
    rewards[torch.arange(mask.shape[0]), last] += scores.to(rewards.dtype)
    return rewards, kl


def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0,
                   lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation by a reverse scan: ``δ_t = r_t + γ V_{t+1} − V_t`` (``V`` is 0 after a
    row's last real token), ``A_t = δ_t + γ λ A_{t+1}``. Returns ``(advantages, returns = A + V)``, 0 outside
    the mask."""
    m = _check(mask, rewards, values)
    values, rewards = values * m, rewards * m
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        following = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * following - values[:, t]
        running = (delta + gamma * lam * running) * m[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * m


def ppo_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                    clip_range: float = 0.2, weights: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate ``mean_t max(−A_t ρ_t, −A_t clip(ρ_t, 1 − ε, 1 + ε))``, ``ρ_t = e^{logπ − logπ_old}``,
    over masked tokens; ``weights`` (detached, like ``mask``): per-token factors of it (importance weights to the
    policy that really sampled, when another engine did). Metrics: ``clip_frac`` (tokens where the clipped term is
    the larger) and ``approx_kl`` (``½ mean (logπ − logπ_old)²``), detached."""
    m = _check(mask, logps, old_logps, advantages).bool()
    ratio = torch.exp(logps - old_logps)
    unclipped, clipped = -advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    per_token = torch.maximum(unclipped, clipped)
    loss = masked_mean(per_token if weights is None else per_token * weights.detach(), m)
    with torch.no_grad():
        metrics = {"clip_frac": masked_mean((clipped > unclipped).float(), m),
                   "approx_kl": masked_mean(0.5 * (logps - old_logps) ** 2, m)}
    return loss, metrics


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, *,
                   clip_range: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``½ mean_t max((V_t − R_t)², (V_old,t + clip(V_t − V_old,t, −ε, ε) − R_t)²)`` over masked tokens.
    Metrics: ``value_clip_frac`` and ``explained_variance`` (``1 − Var(R − V) / Var(R)``), detached."""
    m = _check(mask, values, old_values, returns).bool()
    clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
    plain_error, clipped_error = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(plain_error, clipped_error), m)
    with torch.no_grad():
        r, v = returns[m], values[m]
        explained = 1 - (r - v).var() / r.var() if r.numel() > 1 and r.var() > 0 else torch.zeros(())
        metrics = {"value_clip_frac": masked_mean((clipped_error > plain_error).float(), m),
                   "explained_variance": explained}
    return loss, metrics


class AdaptiveKLController:
    """Ziegler et al. 2019's KL coefficient: after each batch, ``e = clip(KL / target − 1, −0.2, 0.2)`` and
    ``β ← β (1 + e · n_steps / horizon)``, so β grows while the policy drifts past the target KL and shrinks
    below it. ``target None``: a fixed β (``update`` changes nothing)."""

    def __init__(self, init: float, target: float | None = None, horizon: int = 10000):
        if init < 0 or (target is not None and target <= 0) or horizon <= 0:
            raise ValueError(f"the KL controller needs init >= 0, target > 0 (or None) and horizon > 0, got "
                             f"init={init}, target={target}, horizon={horizon}")
        self.value, self.target, self.horizon = float(init), target, horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        """Adjust β after ``n_steps`` samples whose mean KL was ``current_kl``; returns the new β."""
        if self.target is not None:
            error = min(max(current_kl / self.target - 1, -0.2), 0.2)
            self.value *= 1 + error * n_steps / self.horizon
        return self.value
