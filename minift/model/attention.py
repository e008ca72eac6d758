"""Document attention for padding-free packed batches: each document attends causally to itself only.

``collate_flat`` (minift/data/packing.py) lays a micro-batch out as one row of concatenated documents,
no padding, with their boundaries as ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (int32, ``(n_docs + 1,)``,
cumulative lengths from 0). With ``max_length_q`` / ``max_length_k`` (the longest document, added by
``CausalLMLoss``) these are the keyword arguments that transformers' ``flash_attention_2`` takes for its
variable-length kernel. Passed to the model's forward, they reach every attention call.

``"minift_sdpa"`` is the same for PyTorch's SDPA on any device: one ``is_causal`` SDPA call per
document, so no ``[seq, seq]`` mask is ever built and attention costs the sum of the documents'
squared lengths instead of the row's. Without ``cu_seq_lens_q`` (generation, padded batches) it is
transformers' ``sdpa``, masks included, except in a decoding step of minift's sampler whose rows share their
prompts' cache (:func:`_shared_prefix_attention`). :func:`use_document_attention` switches a model loaded with
``sdpa`` to it.

Under the other implementations a flat batch is still correct, only slower: ``sdpa`` and ``eager`` build
a block-diagonal mask from the restarting ``position_ids`` (the whole row's ``[seq, seq]``).
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn.functional as F
from torch import nn

NAME = "minift_sdpa"
_BUILD_MASK = contextvars.ContextVar("minift_build_mask", default=True)


def document_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: torch.Tensor | None, dropout: float = 0.0,
                               scaling: float | None = None, cu_seq_lens_q: torch.Tensor | None = None,
                               **kwargs) -> tuple[torch.Tensor, None]:
    """Attention over ``(1, heads, seq, head_dim)`` inputs, document by document when ``cu_seq_lens_q`` is given.

    Returns ``(1, seq, heads, head_dim)`` as transformers' attention functions do.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    shared = getattr(key, "shared_prefix", None)  # a decoding step of minift's sampler (minift/train/sampling.py)
    if shared is not None and not dropout and all(kwargs.get(k) is None for k in ("s_aux", "softcap", "position_bias")):
        return _shared_prefix_attention(query, key, value, attention_mask, scaling, shared)
    if shared is not None:  # what the shared path does not implement: each row's whole cache, as sdpa takes it
        prompt_keys, prompt_values, slots, group = shared
        key, value = (torch.cat([prompt[slots // group], own], dim=-2) for prompt, own in
                      ((prompt_keys.transpose(-1, -2), key), (prompt_values, value)))
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        raise ValueError("document attention takes one flat row (batch 1, collate_flat) and no KV cache; "
                         f"got batch {query.shape[0]}, {query.shape[2]} queries for {key.shape[2]} keys")
    groups = query.shape[1] // key.shape[1]
    bounds = cu_seq_lens_q.tolist()
    if bounds[0] != 0 or bounds[-1] != query.shape[2]:
        raise ValueError(f"cu_seq_lens_q must run from 0 to the row length {query.shape[2]}, got {bounds[0]}.."
                         f"{bounds[-1]}")
    lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    unsupported = [k for k in ("s_aux", "softcap", "position_bias") if kwargs.get(k) is not None]
    window = kwargs.get("sliding_window")
    if window is not None and max(lengths) > window:
        unsupported.append(f"sliding_window ({window}, shorter than a document)")
    if unsupported:
        raise ValueError(f"{type(module).__name__} uses {', '.join(unsupported)}, which document attention does not "
                         f"implement; train with packing false, or load the model with attn_implementation "
                         f"flash_attention_2")
    if groups > 1:  # grouped-query attention: each KV head serves `groups` query heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    # split, not slices: its backward writes each document's gradient into one buffer (a slice's backward
    # would allocate a zero tensor of the whole row per document)
    parts = [F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True)
             for q, k, v in zip(query.split(lengths, dim=2), key.split(lengths, dim=2), value.split(lengths, dim=2))]
    out = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
    return out.transpose(1, 2).contiguous(), None


def _shared_prefix_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, scaling: float | None,
                             shared: tuple) -> tuple[torch.Tensor, None]:
    """One decoding step whose rows are completions of a few prompts: ``key`` / ``value`` hold each row's own
    tokens, ``shared`` the prompts' (``(keys, values, slots, group)``: row ``i`` is completion ``slots[i] % group``
    of prompt ``slots[i] // group``; the prompts' keys are stored transposed, ``(prompts, kv_heads, head_dim,
    width)``, and their values contiguous, so no step copies them; the mask covers the prompt's positions, then
    the row's). A prompt's keys are read once for all its completions: its rows' queries are stacked into one
    matmul against them. The rows' own keys are read in their cache layout (``key @ qᵀ``: a matmul against a
    transposed cache would copy it every step). One softmax over both parts, in float32."""
    prompt_keys, prompt_values, slots, group = shared
    batch, heads, _, dim = query.shape
    prompts, kv_heads, _, width = prompt_keys.shape
    groups = heads // kv_heads
    complete = len(slots) == prompts * group  # no row has left: the rows are the (prompt, completion) grid

    def to_grid(rows: torch.Tensor) -> torch.Tensor:  # (batch, kv, groups, L) -> (prompts, kv, group x groups, L)
        grid = rows if complete else rows.new_zeros(prompts * group, *rows.shape[1:]).index_copy_(0, slots, rows)
        return grid.view(prompts, group, kv_heads, groups, -1).transpose(1, 2).reshape(prompts, kv_heads,
                                                                                        group * groups, -1)

    def to_rows(grid: torch.Tensor) -> torch.Tensor:
        rows = grid.view(prompts, kv_heads, group, groups, -1).transpose(1, 2).reshape(prompts * group, kv_heads,
                                                                                        groups, -1)
        return rows if complete else rows[slots]

    q = query.view(batch, kv_heads, groups, dim)
    scores = torch.cat([to_rows(to_grid(q) @ prompt_keys), (key @ q.transpose(-1, -2)).transpose(-1, -2)], dim=-1)
    scores = scores.float() * (dim ** -0.5 if scaling is None else scaling)
    if attention_mask is not None:  # (B, 1, 1, prompt + own keys): bool (True = attend) or additive
        mask = attention_mask[:, :, -1:, -scores.shape[-1]:]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    on_prompt, on_own = scores.softmax(-1).to(value.dtype).split([width, key.shape[2]], dim=-1)
    out = to_rows(to_grid(on_prompt) @ prompt_values) + on_own @ value
    return out.view(batch, 1, heads, dim), None


def _mask(*args, **kwargs):
    """transformers' sdpa mask, except inside :func:`flat_forward` (documents are separated by cu_seq_lens)."""
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs) if _BUILD_MASK.get() else None


def register() -> None:
    """Register ``minift_sdpa`` with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(NAME, document_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, _mask)


def use_document_attention(model: nn.Module) -> bool:
    """Switch a model that uses ``sdpa`` to ``minift_sdpa`` (the same except on flat packed batches and in CPU
    decoding steps).

    Returns whether the model now uses it; other implementations (eager, flash_attention_2, ...) are
    left alone: flash_attention_2 reads the same boundaries natively."""
    register()
    if model.config._attn_implementation == "sdpa":
        model.set_attn_implementation(NAME)
    return model.config._attn_implementation == NAME


@contextlib.contextmanager
def flat_forward():
    """Inside: masks are not built for ``minift_sdpa`` (the forward of a flat batch passes cu_seq_lens)."""
    token = _BUILD_MASK.set(False)
    try:
        yield
    finally:
        _BUILD_MASK.reset(token)
