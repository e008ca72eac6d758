"""Cross-entropy and token log-probs through the LM head, chunked: pure functions of tensors (torch only).

LM-head losses take the final hidden states of the positions that have a label, ``hidden (N, H)``,
and the LM head ``weight (V, H)``, instead of logits: they walk over row chunks so that the
``(N, V)`` logits never exist at once (at N = 2048, V = 32k one fp32 copy is 262 MB, and autograd
keeps several). The caller drops masked positions (label -100) *before* the LM head, which also skips
their matmul.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint


def _check_lm_head_inputs(hidden, weight, targets, bias, chunk_size, softcap) -> None:
    """Raise ValueError, saying what shape was expected, on malformed LM-head loss inputs."""
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be (N, H), got shape {tuple(hidden.shape)}: flatten (batch, seq, H) "
                         "and keep only the positions that have a label")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be the LM head (V, H) with H = hidden.shape[1] = {hidden.shape[1]}, "
                         f"got shape {tuple(weight.shape)}")
    n, vocab = hidden.shape[0], weight.shape[0]
    if targets.shape != (n,):
        raise ValueError(f"targets must be (N,) = ({n},) to match hidden, got shape {tuple(targets.shape)}")
    if targets.dtype != torch.long:
        raise ValueError(f"targets must be torch.long, got {targets.dtype}")
    if bias is not None and bias.shape != (vocab,):
        raise ValueError(f"bias must be (V,) = ({vocab},), got shape {tuple(bias.shape)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int (rows per chunk), got {chunk_size!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 (or None for no capping), got {softcap!r}")
    # An out-of-range target would be an opaque index error (a device assert on GPU) deep in the loop.
    if n and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
        raise ValueError(f"targets must lie in [0, {vocab}), got values in [{int(targets.min())}, "
                         f"{int(targets.max())}]: drop ignored positions (label -100) before the LM head")


def _matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear(hidden, weight)`` would compute in: the autocast dtype inside autocast."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _chunk_logits(h, weight, bias, softcap, scale, out_dtype):
    """Logits ``(rows, V)`` of one chunk in ``out_dtype``, and ``tanh(z / softcap)`` (or None) for the derivative.

    ``z = (h @ weight.T + bias) * scale``, then Gemma-2 soft-capping ``softcap * tanh(z / softcap)``.
    """
    logits = (h @ weight.T).to(out_dtype)
    # In place on the fresh matmul output: every extra (rows, V) buffer is memory we set out to save.
    if bias is not None:
        logits += bias
    if scale is not None:
        logits *= scale
    if softcap is None:
        return logits, None
    tanh = logits.div_(softcap).tanh_()
    return tanh * softcap, tanh


def _lm_head_pass(hidden, weight, bias, targets, chunk_size, softcap, scale, dtype,
                  need_h=False, need_w=False, need_b=False, row_weights=None):
    """Per-row CE ``(N,)`` and the gradients of ``sum_i row_weights_i * CE_i`` (weights default 1) where asked for.

    Walks row chunks; each chunk's ``(rows, V)`` logits are turned into its gradient in place and freed.
    """
    acc = torch.promote_types(dtype, torch.float32)  # softmax, losses and weight-grad sums: float32 at least
    w = weight.to(dtype)
    ce = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
    grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
    for start in range(0, hidden.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        h, t = hidden[rows].to(dtype), targets[rows]
        logits, tanh = _chunk_logits(h, w, bias, softcap, scale, acc)
        # logsumexp by hand, in place: the exp(z - max) it needs is also the softmax numerator, so the
        # (rows, V) exp is computed once and no temporary (rows, V) buffer is allocated.
        target_logit = logits.gather(1, t[:, None]).squeeze(1)
        z_max = logits.amax(dim=-1, keepdim=True)
        probs = logits.sub_(z_max).exp_()
        total = probs.sum(dim=-1, keepdim=True)
        ce[rows] = (z_max + total.log()).squeeze(1) - target_logit
        if need_h or need_w or need_b:
            # dCE_i/dlogits_i = softmax - onehot; then the chain through softcap
            # (d/dz softcap*tanh(z/softcap) = 1 - tanh^2) and scale.
            grad = probs.div_(total)
            grad[torch.arange(t.shape[0], device=t.device), t] -= 1
            if row_weights is not None:
                grad *= row_weights[rows, None]
            if tanh is not None:
                grad *= tanh.square_().neg_().add_(1)
            if scale is not None:
                grad *= scale
            if need_b:
                grad_b += grad.sum(0)
            grad = grad.to(dtype)  # the backward matmuls run in the forward's matmul dtype, as autograd's would
            if need_h:
                grad_h[rows] = grad @ w
            if need_w:  # addmm_ accumulates without a (V, H) temporary where the dtypes allow it
                if grad_w.dtype == dtype:
                    grad_w.addmm_(grad.T, h)
                else:
                    grad_w += grad.T @ h
        # Free this chunk's (rows, V) buffers now: otherwise these names keep them alive while the next
        # chunk allocates its own, and the peak is two chunks.
        logits = probs = grad = tanh = None
    return (ce, grad_h, None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype))


def _needs_graph(*tensors) -> bool:
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Forward computes the loss *and* its gradients chunk by chunk; backward only rescales them.

    Taking the gradient in the forward is what lets each chunk's logits be freed at once (a plain
    autograd graph would keep every chunk's softmax alive until backward). It costs no extra matmul,
    and the saved gradients ``(N, H)`` (+ ``(V, H)`` for a trainable head) are small next to ``(N, V)``.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, softcap, scale, dtype):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]  # a frozen (LoRA) head skips the weight matmul
        ce, grad_h, grad_w, grad_b = _lm_head_pass(hidden, weight, bias, targets, chunk_size, softcap, scale,
                                                   dtype, need_h, need_w, need_b)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        return ce.sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        # The loss is linear in each stored gradient's upstream factor: d/dx (g * L) = g * dL/dx.
        grads = [None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors]
        return (*grads, None, None, None, None, None)


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                          chunk_size: int = 1024, bias: torch.Tensor | None = None,
                          softcap: float | None = None, scale: float | None = None) -> torch.Tensor:
    """Summed token cross-entropy through the LM head without materializing the ``(N, V)`` logits.

    hidden ``(N, H)`` (labelled positions only), weight ``(V, H)``, targets ``(N,)`` long, bias ``(V,)``
    -> float32 scalar ``sum_i [logsumexp(z_i) - z_i[targets_i]]``, ``z = cap((hidden @ weight.T + bias) * scale)``
    with ``cap(x) = softcap * tanh(x / softcap)`` (Gemma 2) and ``scale`` a logit scale (Cohere).
    Equals ``F.cross_entropy(z, targets, reduction="sum")``; divide by the token count for the mean.
    Matmuls run in the autocast dtype inside autocast (like ``F.linear``), softmax in float32;
    gradients come back in each input's dtype. Extra memory ~ ``chunk_size * V`` floats, not ``N * V``.
    """
    _check_lm_head_inputs(hidden, weight, targets, bias, chunk_size, softcap)
    dtype = _matmul_dtype(hidden, weight)
    if _needs_graph(hidden, weight, bias):
        return _ChunkedCrossEntropy.apply(hidden, weight, bias, targets, chunk_size, softcap, scale, dtype)
    # Eval or a reference model: the same loop without the gradient matmuls.
    return _lm_head_pass(hidden, weight, bias, targets, chunk_size, softcap, scale, dtype)[0].sum()


class _TokenLogprobs(torch.autograd.Function):
    """``-CE_i`` per row. Its upstream gradient (e.g. from DPO) is only known in backward, so:

    frozen head (LoRA): the forward stores each row's ``dCE_i/dhidden_i`` ``(N, H)`` and backward scales
    row i by ``-grad_i``, as for the summed CE. Trainable head: ``dL/dweight`` sums rows with their
    upstream factors, so backward recomputes the chunks' logits (one extra LM-head matmul) rather than
    keeping ``(N, V)`` of them. Either way at most one chunk of logits exists at a time.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, softcap, scale, dtype):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        ctx.recompute = need_w or need_b
        ce, grad_h, _, _ = _lm_head_pass(hidden, weight, bias, targets, chunk_size, softcap, scale, dtype,
                                         need_h=need_h and not ctx.recompute)
        if ctx.recompute:
            ctx.config = (chunk_size, softcap, scale, dtype, need_h, need_w, need_b)
            ctx.save_for_backward(hidden, weight, bias, targets)
        else:
            ctx.save_for_backward(grad_h)
        return ce.neg_()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logps):
        if not ctx.recompute:
            (grad_h,) = ctx.saved_tensors
            grad_h = None if grad_h is None else grad_h * -grad_logps[:, None].to(grad_h.dtype)
            return grad_h, None, None, None, None, None, None, None
        hidden, weight, bias, targets = ctx.saved_tensors
        chunk_size, softcap, scale, dtype, need_h, need_w, need_b = ctx.config
        _, grad_h, grad_w, grad_b = _lm_head_pass(hidden, weight, bias, targets, chunk_size, softcap, scale, dtype,
                                                  need_h, need_w, need_b, row_weights=-grad_logps)
        return grad_h, grad_w, grad_b, None, None, None, None, None


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                   chunk_size: int = 1024, bias: torch.Tensor | None = None,
                   softcap: float | None = None, scale: float | None = None) -> torch.Tensor:
    """Log-probability of each target token through the LM head, chunked over rows.

    hidden ``(N, H)``, weight ``(V, H)``, targets ``(N,)`` long, bias ``(V,)`` -> ``(N,)`` float32
    ``log_softmax(z_i)[targets_i]`` with ``z`` as in :func:`chunked_cross_entropy`. Sum per sequence
    for DPO / PPO-style sequence log-probs.
    """
    _check_lm_head_inputs(hidden, weight, targets, bias, chunk_size, softcap)
    dtype = _matmul_dtype(hidden, weight)
    if _needs_graph(hidden, weight, bias):
        return _TokenLogprobs.apply(hidden, weight, bias, targets, chunk_size, softcap, scale, dtype)
    return _lm_head_pass(hidden, weight, bias, targets, chunk_size, softcap, scale, dtype)[0].neg_()


def segment_sums(values: torch.Tensor, segment: torch.Tensor, num_segments: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-segment float32 sums ``(S,)`` of ``values (N,)`` (differentiable) and counts ``(S,)``, for ids in [0, S)."""
    sums = values.new_zeros(num_segments, dtype=torch.float32).index_add(0, segment, values.float())
    counts = torch.zeros(num_segments, dtype=torch.long, device=segment.device).index_add_(
        0, segment, torch.ones_like(segment))
    return sums, counts


def _chunk_target_logprob(flat: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log softmax(flat[rows])[targets]`` in float32 for one chunk of rows of the ``(B*T, V)`` logits."""
    logits = flat.index_select(0, rows)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)


def completion_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, segment_ids: torch.Tensor | None = None,
                        num_segments: int | None = None, chunk_size: int = 1024,
                        ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed and mean completion log-probs per sequence from logits, one row chunk in float32 at a time.

    logits ``(B, T, V)`` (any float dtype), labels ``(B, T)`` in the Hugging Face layout (``logits[:, t]``
    predicts ``labels[:, t + 1]``; ``ignore_index`` on the prompt and padding) -> ``sums (S,)`` float32
    ``sum_t log softmax(logits[:, t])[labels[:, t + 1]]`` and ``means (S,)`` = sums / completion tokens.
    ``S = B`` (row b is sequence b), or with ``segment_ids (B, T)`` (packed rows: the document id of each
    token, e.g. ``doc_index`` from ``collate_packed``) one entry per document, ``S = num_segments``.
    Each chunk of trained rows is upcast, reduced and, under autograd, recomputed in backward
    (checkpointed), so no float32 copy of the ``(B, T, V)`` logits is ever held.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"logits must be (B, T, V) and labels (B, T) with the same B, T; got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    if segment_ids is not None and segment_ids.shape != labels.shape:
        raise ValueError(f"segment_ids must have the labels' shape {tuple(labels.shape)}, got {tuple(segment_ids.shape)}")
    batch, length = labels.shape
    targets = labels[:, 1:]
    mask = targets != ignore_index
    t = targets[mask]
    # Flat row numbers of the trained positions; each chunk gathers only its own rows of the logits.
    flat = logits.reshape(batch * length, logits.shape[-1])
    where = (torch.arange(batch, device=labels.device)[:, None] * length
             + torch.arange(length - 1, device=labels.device))[mask]
    if segment_ids is None:
        segment = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(targets)[mask]
        num_segments = batch
    else:
        segment = segment_ids[:, 1:][mask]
        num_segments = num_segments if num_segments is not None else int(segment_ids.max()) + 1
    parts = []
    for rows, tt in zip(where.split(chunk_size), t.split(chunk_size)):
        if torch.is_grad_enabled() and logits.requires_grad:
            parts.append(torch.utils.checkpoint.checkpoint(_chunk_target_logprob, flat, rows, tt, use_reentrant=False))
        else:
            parts.append(_chunk_target_logprob(flat, rows, tt))
    logps = torch.cat(parts) if parts else logits.new_zeros(0, dtype=torch.float32)
    sums, counts = segment_sums(logps, segment, num_segments)
    return sums, sums / counts.clamp(min=1)
