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

:func:`chunked_distill_loss` takes hidden states and LM heads instead of logits and walks row chunks, taking each
chunk's gradient inside the forward, so that no ``(N, V)`` student or teacher logits ever exist at once.
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


def _teacher_chunk(rows: slice, teacher: tuple, vocab: int, dtype: torch.dtype) -> tuple[str, tuple]:
    """One chunk of the teacher: ``("dense", (logits,))`` from its hidden states and head, or ``("sparse", (ids,
    logps))`` from its top-k."""
    hidden, weight, bias, ids, logps = teacher
    if hidden is None:
        return "sparse", (ids[rows], logps[rows])
    logits = hidden[rows].to(dtype) @ weight[:vocab].to(dtype).T
    if bias is not None:
        logits += bias[:vocab]
    return "dense", (logits,)


def _distill_pass(hidden, weight, bias, teacher, chunk_size, beta, temperature, vocab, dtype,
                  need_h=False, need_w=False, need_b=False):
    """Summed divergence, and its gradients where asked for, one chunk of ``(rows, V)`` logits at a time."""
    acc = torch.promote_types(dtype, torch.float32)
    w = weight[:vocab].to(dtype)
    b = None if bias is None else bias[:vocab]
    total = torch.zeros((), dtype=acc, device=hidden.device)
    grad_h = torch.zeros_like(hidden) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
    grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
    for start in range(0, hidden.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        h = hidden[rows].to(dtype)
        logits = (h @ w.T).to(acc)
        if b is not None:
            logits += b
        kind, parts = _teacher_chunk(rows, teacher, vocab, dtype)
        want_grad = need_h or need_w or need_b
        with torch.enable_grad():  # autograd only from this chunk's logits to its divergence
            logits.requires_grad_(want_grad)
            div = (distill_divergence(logits, parts[0], beta=beta, temperature=temperature) if kind == "dense"
                   else sparse_distill_divergence(logits, *parts, beta=beta, temperature=temperature)).sum()
            grad = torch.autograd.grad(div, logits)[0] if want_grad else None
        total += div.detach()
        if want_grad:
            if need_b:
                grad_b[:vocab] += grad.sum(0)
            grad = grad.to(dtype)
            if need_h:
                grad_h[rows] = grad @ w
            if need_w:
                grad_w[:vocab] += grad.T @ h
        logits = grad = div = parts = None  # free this chunk before the next one allocates
    return (total, grad_h, None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype))


class _ChunkedDistill(torch.autograd.Function):
    """The forward computes the summed divergence and its gradients chunk by chunk; the backward only scales them
    (as :class:`minift.losses.lm_head._ChunkedCrossEntropy` does for the cross-entropy)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher, chunk_size, beta, temperature, vocab, dtype):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        total, *grads = _distill_pass(hidden, weight, bias, teacher, chunk_size, beta, temperature, vocab, dtype,
                                      need_h, need_w, need_b)
        ctx.save_for_backward(*grads)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grads = [None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors]
        return (*grads, None, None, None, None, None, None)


def chunked_distill_loss(hidden: torch.Tensor, weight: torch.Tensor, *, bias: torch.Tensor | None = None,
                         teacher_hidden: torch.Tensor | None = None, teacher_weight: torch.Tensor | None = None,
                         teacher_bias: torch.Tensor | None = None, teacher_ids: torch.Tensor | None = None,
                         teacher_logps: torch.Tensor | None = None, beta: float = 0.5, temperature: float = 1.0,
                         vocab_size: int | None = None, chunk_size: int = 1024) -> torch.Tensor:
    """Summed generalized JSD over positions, through the student's LM head, without ``(N, V)`` logits.

    hidden ``(N, Hs)`` (the student's final hidden states at the trained positions), weight ``(Vs, Hs)`` (its LM
    head), bias ``(Vs,)``. The teacher is either dense, ``teacher_hidden (N, Ht)`` with ``teacher_weight (Vt, Ht)``
    (and ``teacher_bias``), or sparse, ``teacher_ids`` / ``teacher_logps`` ``(N, k)`` (see
    :func:`sparse_distill_divergence`). ``vocab_size``: the rows of both heads that are real tokens (default
    ``min(Vs, Vt)``): an embedding padded past the tokenizer (Qwen2.5: 151,936 rows in one size, 152,064 in
    another) is sliced, not refused. -> float32 scalar ``Σ_i JSD_β(student_i, teacher_i)``; equals
    ``distill_divergence(student_logits, teacher_logits).sum()``. Matmuls run in the autocast dtype inside autocast,
    divergences in float32. Extra memory ~ a few ``chunk_size x V`` floats; the saved gradients are ``(N, Hs)``
    (+ ``(Vs, Hs)`` for a trainable head).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"hidden must be (N, H) and weight (V, H), got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    dense = teacher_hidden is not None
    if dense == (teacher_ids is not None) or dense != (teacher_weight is not None) or \
            (teacher_ids is None) != (teacher_logps is None):
        raise ValueError("give the teacher either as teacher_hidden + teacher_weight (dense) or as teacher_ids + "
                         "teacher_logps (its top-k), not both or neither")
    n = hidden.shape[0]
    if dense and (teacher_hidden.dim() != 2 or teacher_hidden.shape[0] != n
                  or teacher_weight.shape[1:] != teacher_hidden.shape[1:]):
        raise ValueError(f"teacher_hidden must be (N, Ht) with N = {n} and teacher_weight (Vt, Ht), got "
                         f"{tuple(teacher_hidden.shape)} and {tuple(teacher_weight.shape)}")
    if not dense and (teacher_ids.dim() != 2 or teacher_ids.shape != teacher_logps.shape or teacher_ids.shape[0] != n):
        raise ValueError(f"teacher_ids and teacher_logps must both be (N, k) with N = {n}, got "
                         f"{tuple(teacher_ids.shape)} and {tuple(teacher_logps.shape)}")
    vocab = min(weight.shape[0], teacher_weight.shape[0]) if dense else weight.shape[0]
    vocab = vocab_size or vocab
    if vocab > weight.shape[0] or (dense and vocab > teacher_weight.shape[0]):
        raise ValueError(f"vocab_size {vocab} is more than a head has rows (student {weight.shape[0]}"
                         + (f", teacher {teacher_weight.shape[0]})" if dense else ")"))
    if not dense and n and int(teacher_ids.max()) >= vocab:
        raise ValueError(f"teacher_ids reach {int(teacher_ids.max())}, past the vocabulary ({vocab} rows)")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int (rows per chunk), got {chunk_size!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else \
        torch.promote_types(hidden.dtype, weight.dtype)
    teacher = (teacher_hidden, teacher_weight, teacher_bias, teacher_ids, teacher_logps)
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (hidden, weight, bias)):
        return _ChunkedDistill.apply(hidden, weight, bias, teacher, chunk_size, beta, temperature, vocab, dtype)
    return _distill_pass(hidden, weight, bias, teacher, chunk_size, beta, temperature, vocab, dtype)[0]
