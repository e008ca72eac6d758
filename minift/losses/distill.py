"""Knowledge-distillation divergences between a student's and a teacher's next-token distributions: pure
functions of tensors (torch only).

Inputs are per-position: ``(N, V)`` logits of the N trained positions (select them with the label mask first).
Each function returns the per-position divergence ``(N,)`` summed over the vocabulary; the caller reduces (the
mean over positions equals trl's ``generalized_jsd_loss`` with ``reduction="batchmean"``, which the tests check).

Generalized JSD (Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from Self-Generated
Mistakes", GKD, 2306.13649), with S the student, T the teacher and ``M = (1 − β) S + β T``::

    JSD_β = β KL(T ‖ M) + (1 − β) KL(S ‖ M);   β = 0: KL(T ‖ S) (forward KL), β = 1: KL(S ‖ T) (reverse KL)

taken exactly at β = 0 and 1 (the interior formula tends to 0 there). Both distributions are softmaxes of the
logits divided by ``temperature``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """``KL(P ‖ Q)`` per row from log-probabilities (0 log 0 = 0)."""
    return (p_log.exp() * (p_log - q_log)).nan_to_num(0.0).sum(-1)


def _jsd(student_log: torch.Tensor, teacher_log: torch.Tensor, beta: float) -> torch.Tensor:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1] (0: forward KL, 1: reverse KL), got {beta}")
    if beta == 0.0:
        return _kl(teacher_log, student_log)
    if beta == 1.0:
        return _kl(student_log, teacher_log)
    mixture = torch.logsumexp(torch.stack([student_log + math.log1p(-beta), teacher_log + math.log(beta)]), dim=0)
    return beta * _kl(teacher_log, mixture) + (1 - beta) * _kl(student_log, mixture)


def distill_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, beta: float = 0.5,
                       temperature: float = 1.0) -> torch.Tensor:
    """Generalized JSD between full distributions, ``(N, V)`` logits each -> ``(N,)``. Computed in float32 (or
    float64 for float64 inputs); a teacher with more rows than the student (a padded embedding) is refused here:
    slice it to the shared vocabulary first."""
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(f"student and teacher logits must both be (N, V), got {tuple(student_logits.shape)} and "
                         f"{tuple(teacher_logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    student = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    return _jsd(student, teacher, beta)


def sparse_distill_divergence(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logps: torch.Tensor, *,
                              beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """Generalized JSD against a teacher known only by its top-k (an API's ``top_logprobs``, or a cached file):
    ``teacher_ids`` / ``teacher_logps`` ``(N, k)``, its log-probabilities at temperature 1. Both distributions
    are reduced to k + 1 buckets: the k tokens and one tail bucket holding the rest of the mass (the teacher's
    ``1 − Σ top-k``, the student's own mass outside those ids). ``temperature`` scales the student only (a
    truncated teacher cannot be re-tempered). With k = V − 1 or V this equals :func:`distill_divergence`."""
    n = student_logits.shape[0]
    if teacher_ids.shape != teacher_logps.shape or teacher_ids.dim() != 2 or teacher_ids.shape[0] != n:
        raise ValueError(f"teacher_ids and teacher_logps must both be (N, k) with N = {n}, got "
                         f"{tuple(teacher_ids.shape)} and {tuple(teacher_logps.shape)}")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    student = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    top = student.gather(1, teacher_ids)
    tiny = torch.finfo(dtype).tiny
    student_tail = torch.log((1 - top.exp().sum(-1, keepdim=True)).clamp_min(tiny))
    teacher_logps = teacher_logps.to(dtype)
    teacher_tail = torch.log((1 - teacher_logps.exp().sum(-1, keepdim=True)).clamp_min(tiny))
    return _jsd(torch.cat([top, student_tail], -1), torch.cat([teacher_logps, teacher_tail], -1), beta)
