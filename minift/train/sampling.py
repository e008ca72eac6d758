"""The one generation engine: batched sampling with a KV cache, per-row options, stop strings and streaming.

Every prompt is prefilled once, however many completions it gets; rows that finish (EOS, a stop string,
their token budget) leave the batch at once, so a long answer does not keep short ones computing. Each
completion draws its randomness from its own generator, seeded by :func:`row_seed`, so completion ``j`` of a
prompt depends only on its seed and ``j``: not on the batch it shared, nor on how many processes sample.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from minift.model.attention import NAME as ATTENTION
from minift.train.forward import evaluation_mode


@dataclass(frozen=True)
class SamplingParams:
    """How one prompt is completed. ``temperature`` 0 is greedy decoding (the other sampling options are then
    unused); ``top_k`` 0 and ``top_p`` 1 and ``min_p`` 0 switch those filters off. ``stop``: strings that end the
    completion (cut from its text). ``top_logprobs``: how many alternatives to report per token."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    stop: tuple[str, ...] = ()
    seed: int = 0
    top_logprobs: int = 0

    def __post_init__(self):
        checks = [(self.max_new_tokens >= 1, "max_new_tokens must be at least 1"),
                  (self.temperature >= 0, "temperature must be >= 0 (0: greedy)"),
                  (0 < self.top_p <= 1, "top_p must be in (0, 1]"), (self.top_k >= 0, "top_k must be >= 0 (0: off)"),
                  (0 <= self.min_p < 1, "min_p must be in [0, 1)"), (self.top_logprobs >= 0, "top_logprobs must be >= 0"),
                  (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings")]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message}, got {self}")


@dataclass
class Completion:
    """One sampled completion. ``token_ids`` include the EOS token that ended it (if one did); ``text`` is their
    decoding without special tokens, cut before a stop string. ``logprobs[t]``: the model's log-probability
    (temperature 1, before any filtering) of token ``t``; ``top_logprobs[t]``: the most likely ``(id, logprob)``
    at that position. ``finish_reason``: ``stop`` (EOS or a stop string) or ``length``."""

    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"


def row_seed(*parts: int) -> int:
    """A 63-bit seed from integers (e.g. run seed, step, prompt index, sample index), stable across machines."""
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def stop_token_ids(model: nn.Module, tokenizer) -> set[int]:
    """The ids that end a completion: the tokenizer's EOS and those of the model's generation config."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(configured) if isinstance(configured, (list, tuple)) else ({configured} if configured is not None else set())
    return ids


class _Row:
    """The decoding state of one completion: its tokens, its text so far, and what has been streamed."""

    def __init__(self, prompt: list[int], params: SamplingParams, seed: int):
        self.params, self.completion = params, Completion(prompt_ids=list(prompt))
        self.generator = torch.Generator().manual_seed(seed)
        self.streamed = 0  # characters of the text already passed to on_text

    def add(self, token: int, logprob: float, top: list[tuple[int, float]], tokenizer, stops: set[int],
            streaming: bool) -> bool:
        """Record one token; True when the completion is finished. The text is decoded every step only when
        stop strings or streaming need it, else once at the end."""
        c = self.completion
        c.token_ids.append(token)
        c.logprobs.append(logprob)
        if self.params.top_logprobs:
            c.top_logprobs.append(top)
        done = token in stops or len(c.token_ids) >= self.params.max_new_tokens
        if token in stops:
            c.finish_reason = "stop"
        if done or streaming or self.params.stop:
            c.text = tokenizer.decode(c.token_ids, skip_special_tokens=True)
            hits = [i for i in (c.text.find(s) for s in self.params.stop) if i >= 0]
            if hits:
                c.text, c.finish_reason, done = c.text[: min(hits)], "stop", True
        return done

    def unstreamed(self, finished: bool) -> str:
        """New text that is safe to show: while running, hold back an unfinished UTF-8 character and any tail
        that could be the start of a stop string."""
        text = self.completion.text
        end = len(text)
        if not finished:
            end -= text.endswith("\ufffd")
            held = 0
            for s in self.params.stop:
                held = max([held] + [k for k in range(1, len(s)) if text[:end].endswith(s[:k])])
            end -= held
        new = text[self.streamed: max(end, self.streamed)]
        self.streamed = max(end, self.streamed)
        return new


def _pick(logits: torch.Tensor, probs: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
    """Next token per row ``(B,)`` from raw logits ``(B, V)`` and their softmax: argmax for greedy rows; otherwise
    temperature, top-k, top-p and min-p filtering, then one uniform draw from the row's generator through the CDF.
    Rows with no filter take the CDF in vocabulary order (no sort: a full-vocabulary sort per step costs more than
    the model's linear layers on a small model); the others in descending order, which the filters need."""
    sampled = [i for i, r in enumerate(rows) if r.params.temperature > 0]
    if len(sampled) < len(rows):
        choice = logits.argmax(-1)
    else:
        choice = logits.new_empty(len(rows), dtype=torch.long)
    if not sampled:
        return choice
    plain = [i for i in sampled if not _filters(rows[i].params)]
    filtered = [i for i in sampled if _filters(rows[i].params)]
    for group in (plain, filtered):
        if group:
            index = torch.tensor(group, device=logits.device)
            temps = [rows[i].params.temperature for i in group]
            draws = torch.cat([torch.rand(1, generator=rows[i].generator) for i in group]).to(logits.device)[:, None]
            # the common case (every row sampled alike at temperature 1) draws from the softmax already taken
            if group is plain and len(group) == len(rows) and all(t == 1 for t in temps):
                choice[index] = _invert(probs, draws)
                continue
            scaled = logits if len(group) == len(rows) else logits[index]
            if any(t != 1 for t in temps):
                scaled = scaled / torch.tensor(temps, device=logits.device)[:, None]
            choice[index] = _draw_plain(scaled, draws) if group is plain else \
                _draw_filtered(scaled, [rows[i].params for i in group], draws)
    return choice


def _filters(p: SamplingParams) -> bool:
    return p.top_k > 0 or p.top_p < 1 or p.min_p > 0


def _draw_plain(scaled: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    return _invert(scaled.softmax(-1), draws)


def _draw_filtered(scaled: torch.Tensor, params: list[SamplingParams], draws: torch.Tensor) -> torch.Tensor:
    ordered, order = scaled.sort(dim=-1, descending=True)
    probs = ordered.softmax(-1)
    device = scaled.device
    rank = torch.arange(probs.shape[-1], device=device)[None]
    top_k = torch.tensor([p.top_k or probs.shape[-1] for p in params], device=device)[:, None]
    top_p = torch.tensor([p.top_p for p in params], device=device)[:, None]
    min_p = torch.tensor([p.min_p for p in params], device=device)[:, None]
    drop = (rank >= top_k) | (probs.cumsum(-1) - probs > top_p) | (probs < min_p * probs[:, :1])
    drop[:, 0] = False  # the most likely token always survives
    position = _invert(probs.masked_fill(drop, 0), draws)
    return order.gather(1, position[:, None]).squeeze(1)


BLOCK = 256


def _invert(weights: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """The index where the running sum of each row's ``weights`` (unnormalized probabilities ``(B, V)``) first
    exceeds ``draw x total``: a token of zero probability can never be it, not even for a draw of 0. Found block by
    block (the block's end in the running sum of block sums, then the token inside that block): a running sum over
    the whole vocabulary is sequential along each row, 2.5 ms of a decoding step for 32 rows of SmolLM2's 49,152
    logits. Rounding between the two sums may point just outside the block's nonzero weights; the pick is kept
    inside them."""
    rows, size = weights.shape
    blocks = (F.pad(weights, (0, -size % BLOCK)) if size % BLOCK else weights).view(rows, -1, BLOCK)
    sums = blocks.sum(-1)
    ends = sums.cumsum(-1)
    target = draws * ends[:, -1:]
    block = torch.searchsorted(ends, target, right=True).clamp(max=ends.shape[1] - 1)
    inside = blocks.gather(1, block[:, :, None].expand(-1, 1, BLOCK)).squeeze(1)
    start = ends.gather(1, block) - sums.gather(1, block)
    within = torch.searchsorted(inside.cumsum(-1), target - start, right=True)
    nonzero = (inside > 0).int()
    first, last = nonzero.argmax(-1, keepdim=True), BLOCK - 1 - nonzero.flip(-1).argmax(-1, keepdim=True)
    return (block * BLOCK + within.clamp(min=first, max=last)).squeeze(1).clamp(max=size - 1)


def _chosen_logprobs(logits: torch.Tensor, probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Each row's log-probability of its token: the log of the softmax already taken, unless a token's probability
    is too small for float32 to hold it well (drawn at a high temperature); then from a log-softmax."""
    chosen = probs.gather(1, tokens[:, None]).squeeze(1)
    if bool((chosen > 1e-30).all()):
        return chosen.log()
    return logits.log_softmax(-1).gather(1, tokens[:, None]).squeeze(1)


@torch.inference_mode()
def sample(model: nn.Module, tokenizer, prompts: list[list[int]], params: SamplingParams | list[SamplingParams], *,
           n: int = 1, on_text: Callable[[int, str, Completion | None], bool | None] | None = None) -> list[Completion]:
    """``n`` completions of each prompt (token ids, chat template already applied), returned prompt-major:
    completion ``j`` of prompt ``i`` is at ``i * n + j`` and draws from ``row_seed(params[i].seed, j)``.

    ``params``: one for all prompts or one per prompt. ``on_text(k, new_text, completion)``: called as text of
    completion ``k`` becomes final (``completion`` is passed once, when it has finished), for streaming; when it
    returns False, completion ``k`` stops there (a server's client disconnected) and the others go on.
    """
    params = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
    if len(params) != len(prompts):
        raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
    if not prompts or any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token")
    with evaluation_mode(model):
        return _decode(model, tokenizer, prompts, params, n, on_text)


def sample_chunks(model: nn.Module, tokenizer, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                  *, chunk: int = 64) -> Iterator[tuple[int, Completion]]:
    """:func:`sample` (one completion a prompt), ``chunk`` prompts at a time: yields ``(prompt index, completion)``
    as each chunk finishes, so a caller can keep what is done (a cache) and no batch grows with the list."""
    params = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
    for start in range(0, len(prompts), chunk):
        done = sample(model, tokenizer, prompts[start: start + chunk], params[start: start + chunk])
        yield from enumerate(done, start)


class _ChunkedLayer(DynamicLayer):
    """A KV-cache layer whose buffers grow ``CHUNK`` positions at a time and are filled in place. transformers'
    layer concatenates each step's keys and values onto the cache, which copies the whole cache of every layer at
    every step: on SmolLM2 (30 layers, 32 rows of ~200 tokens) that was a third of a decoding step, as memory
    traffic. Attention reads the whole buffer, contiguous (a matmul against a strided view of its filled part
    costs 4x more in bf16); its unfilled tail is masked (transformers pads the 2D attention mask with zeros up to
    the length :meth:`get_mask_sizes` reports)."""

    CHUNK = 32

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.keys, self.values, self.filled = key_states[:, :, :0], value_states[:, :, :0], 0

    def _capacity(self, length: int) -> int:
        current = self.keys.shape[-2] if self.is_initialized else 0
        return current if length <= current else -(-length // self.CHUNK) * self.CHUNK

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.filled + key_states.shape[-2]
        capacity = self._capacity(end)
        if capacity > self.keys.shape[-2]:
            self.keys, self.values = (torch.cat([t, t.new_zeros(*t.shape[:2], capacity - t.shape[-2], t.shape[-1])],
                                                dim=-2) for t in (self.keys, self.values))
        self.keys[:, :, self.filled:end], self.values[:, :, self.filled:end] = key_states, value_states
        self.filled = end
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._capacity(self._own_length() + query_length), 0

    def _own_length(self) -> int:
        return self.filled if self.is_initialized else 0

    def get_seq_length(self) -> int:
        return self._own_length()


class _SharedPrefixLayer(_ChunkedLayer):
    """A :class:`_ChunkedLayer` that keeps each prompt's keys and values once, however many completions it has
    (``minift_sdpa`` models). The prefill stores the prompts' as the prefix; after it, the chunked buffers hold
    each row's own tokens only. The keys it returns carry the prefix as ``shared_prefix``: ``(keys, values,
    slots, group)`` (the keys transposed, as the attention reads them), where row ``i`` is completion
    ``slots[i] % group`` of prompt ``slots[i] // group``. A decoding step's attention (minift/model/attention.py)
    then reads a prompt's cache once for all its completions, instead of once per row from ``group`` copies: on
    SmolLM2 with 8 completions of 128-token prompts, that was a fifth of a step, spent reading the cache."""

    prefix: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.prefix is None:  # the prefill: the prompts attend to themselves as usual
            self.prefix, self.group = (key_states.transpose(-1, -2).contiguous(), value_states.contiguous()), 1
            self.slots = torch.arange(len(key_states), device=key_states.device)
            return key_states, value_states
        keys, values = super().update(key_states, value_states)
        keys.shared_prefix = (*self.prefix, self.slots, self.group)  # no reference to the layer: no cycle
        return keys, values

    def _width(self) -> int:
        return self.prefix[1].shape[-2] if self.prefix is not None else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.prefix is None:
            return query_length, 0
        own, _ = super().get_mask_sizes(query_length)
        return self._width() + own, 0

    def get_seq_length(self) -> int:
        return self._width() + self._own_length()

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Each prompt's ``repeats`` completions share its prefix: no copy."""
        self.group = repeats
        self.slots = torch.arange(len(self.slots) * repeats, device=self.slots.device)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.slots = self.slots[indices]
        if self._own_length():
            self.keys, self.values = self.keys[indices], self.values[indices]


SHARE_FROM = 400_000


def _shares_prompts(model: nn.Module, prompts: int, width: int, n: int) -> bool:
    """Whether each prompt's ``n`` completions read one copy of its cache (:class:`_SharedPrefixLayer`): on
    ``minift_sdpa``, when copies would repeat at least ``SHARE_FROM`` key elements a layer. Below that, the shared
    attention's extra small operations cost more than the reads they save (bf16 on the CPU, 4 prompts x 8
    completions: model A 5% slower at 230k, 4% faster at 460k; SmolLM2 even at 344k, 7% faster at 688k)."""
    if model.config._attn_implementation != ATTENTION:
        return False
    cfg = model.config.get_text_config()
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return (n - 1) * prompts * width * kv_heads * head_dim >= SHARE_FROM


def _decode(model, tokenizer, prompts, params, n, on_text) -> list[Completion]:
    device = next(model.parameters()).device
    stops = stop_token_ids(model, tokenizer)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    chunked = _SharedPrefixLayer if _shares_prompts(model, len(prompts), width, n) else _ChunkedLayer
    cache.layers = [chunked() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                   logits_to_keep=1).logits[:, -1]
    if n > 1:  # each prompt was prefilled once; its n completions share that cache
        cache.batch_repeat_interleave(n)
        logits, mask = logits.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
    rows = [_Row(prompts[k // n], params[k // n], row_seed(params[k // n].seed, k % n)) for k in range(len(prompts) * n)]
    alive = list(range(len(rows)))
    last_position = mask.sum(-1) - 1
    while alive:
        logits = logits.float()
        probs = logits.softmax(-1)
        tokens = _pick(logits, probs, [rows[k] for k in alive])
        chosen = _chosen_logprobs(logits, probs, tokens).tolist()
        picked = tokens.tolist()
        k_top = max(rows[k].params.top_logprobs for k in alive)
        top = logits.log_softmax(-1).topk(k_top, dim=-1) if k_top else None
        keep = []
        for slot, k in enumerate(alive):
            alts = []
            if top is not None:
                count = rows[k].params.top_logprobs
                alts = list(zip(top.indices[slot, :count].tolist(), top.values[slot, :count].tolist()))
            done = rows[k].add(picked[slot], chosen[slot], alts, tokenizer, stops, on_text is not None)
            if on_text is not None:
                new = rows[k].unstreamed(done)
                if (new or done) and on_text(k, new, rows[k].completion if done else None) is False:
                    done = True  # its reader has gone: the row leaves the batch unfinished
            if not done:
                keep.append(slot)
        if not keep:
            break
        if len(keep) < len(alive):  # finished rows leave the batch and the cache
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            tokens, mask, last_position = tokens[index], mask[index], last_position[index]
            alive = [alive[s] for s in keep]
        mask = torch.cat([mask, mask.new_ones((len(alive), 1))], dim=1)
        last_position = last_position + 1
        logits = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=last_position[:, None],
                       cache=cache, use_cache=True).logits[:, -1]
    return [r.completion for r in rows]
