"""Pack tokenized examples into fixed-length rows without cross-document attention; collators.

A packed row concatenates several documents. ``position_ids`` restart at 0 for every document, and
the collated batch carries **no** ``attention_mask``: transformers 5.x then builds a block-diagonal
causal mask from the restarts (sdpa and eager attention), so a document attends only to itself.
That holds only when no KV cache is passed: every forward on packed rows must pass ``use_cache=False``
(a default forward creates a cache and documents silently attend to each other).

Training uses :func:`collate_flat`: a micro-batch's rows joined into one row with no padding at all,
its document boundaries passed to the model (``cu_seq_lens_q``), so that attention runs document by
document without a mask (minift/model/attention.py). :func:`collate_packed` keeps the rows apart.

The label at each document's first token is -100: HF models shift labels internally (``logits[t]``
predicts ``labels[t + 1]``), so otherwise the previous document's last token would be trained to
predict the next document's first token.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from minift.constants import IGNORE_INDEX

logger = logging.getLogger(__name__)

CHOSEN, REJECTED = 0, 1

# A packed row: python lists. Per token: "input_ids", "labels", "position_ids". Per document, in row
# order: "doc_lengths", "example_index" (index of the input example) and, from pack_pairs, "role".
PackedRow = dict[str, list[int]]


@dataclass
class PackingStats:
    """What packing produced. ``efficiency`` = real_tokens / capacity, capacity = n_rows * max_seq_length."""

    n_examples: int  # input examples (pairs, for pack_pairs) received
    n_docs: int  # documents placed in rows
    n_rows: int
    real_tokens: int
    capacity: int
    n_dropped: int = 0  # longer than max_seq_length, skipped because drop_long=True
    n_empty: int = 0  # no tokens, skipped
    efficiency: float = field(init=False)

    def __post_init__(self) -> None:
        self.efficiency = self.real_tokens / self.capacity if self.capacity else 0.0

    def __str__(self) -> str:
        return (f"{self.n_examples:,} examples -> {self.n_docs:,} docs in {self.n_rows:,} rows, "
                f"{self.real_tokens:,}/{self.capacity:,} tokens real ({self.efficiency:.1%}); "
                f"dropped {self.n_dropped:,} too long, {self.n_empty:,} empty")


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Assign items to bins of ``capacity``: longest first, each into the fullest bin it fits in.

    Returns, per bin, the item indices in placement order. Deterministic (ties broken by index).
    O(n log n): open bins are bucketed by remaining room, and the smallest room >= the item's length
    is found by bisecting the sorted list of distinct rooms (at most ``capacity`` entries).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    rooms: list[int] = []  # sorted distinct remaining capacities of open bins
    by_room: dict[int, list[int]] = {}  # remaining capacity -> bin ids

    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(rooms, n)
        if k < len(rooms):
            room = rooms[k]
            b = by_room[room].pop()
            if not by_room[room]:
                del by_room[room]
                rooms.pop(k)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        left = room - n
        if left > 0:
            if left not in by_room:
                bisect.insort(rooms, left)
                by_room[left] = []
            by_room[left].append(b)
    return bins


def _fields(record: dict, prefix: str, what: str) -> tuple[Sequence[int], Sequence[int]]:
    """``record[prefix + "input_ids"]`` and ``record[prefix + "labels"]``, checked to be the same length."""
    missing = [k for k in (f"{prefix}input_ids", f"{prefix}labels") if k not in record]
    if missing:
        raise ValueError(f"{what} has no {' or '.join(map(repr, missing))} (keys: {sorted(record)}); tokenize "
                         f"with labels, -100 marking tokens that are not trained")
    input_ids, labels = record[f"{prefix}input_ids"], record[f"{prefix}labels"]
    if len(input_ids) != len(labels):
        raise ValueError(f"{what} has {len(input_ids)} {prefix}input_ids but {len(labels)} {prefix}labels; they "
                         f"must be the same length (-100 marks tokens that are not trained)")
    return input_ids, labels


def _build_rows(docs: list[tuple[Sequence[int], Sequence[int], int, int | None]],
                bins: list[list[int]]) -> list[PackedRow]:
    """Concatenate documents ``(input_ids, labels, example_index, role)`` into rows; first label -> -100."""
    rows = []
    for members in bins:
        row: PackedRow = {"input_ids": [], "labels": [], "position_ids": [], "doc_lengths": [], "example_index": []}
        for d in members:
            ids, labels, example, role = docs[d]
            row["input_ids"].extend(ids)
            row["labels"].extend(labels)
            row["labels"][-len(ids)] = IGNORE_INDEX
            row["position_ids"].extend(range(len(ids)))
            row["doc_lengths"].append(len(ids))
            row["example_index"].append(example)
            if role is not None:
                row.setdefault("role", []).append(role)
        rows.append(row)
    return rows


def _pack(docs: list[tuple[Sequence[int], Sequence[int], int, int | None]], n_examples: int, max_seq_length: int,
          n_dropped: int, n_empty: int, log_level: int = logging.INFO) -> tuple[list[PackedRow], PackingStats]:
    bins = best_fit_decreasing([len(d[0]) for d in docs], max_seq_length)
    rows = _build_rows(docs, bins)
    stats = PackingStats(n_examples=n_examples, n_docs=len(docs), n_rows=len(rows),
                         real_tokens=sum(len(d[0]) for d in docs), capacity=len(rows) * max_seq_length,
                         n_dropped=n_dropped, n_empty=n_empty)
    logger.log(log_level, "packing: %s", stats)
    return rows, stats


def _too_long(what: str, length: int, max_seq_length: int) -> ValueError:
    return ValueError(f"{what} has {length} tokens, more than max_seq_length={max_seq_length}; truncate it when "
                      f"tokenizing, raise max_seq_length, or pass drop_long=True to skip such examples")


def _check_max(max_seq_length: int) -> None:
    if max_seq_length < 1:
        raise ValueError(f"max_seq_length must be >= 1, got {max_seq_length}")


def pack_examples(examples: Sequence[dict], max_seq_length: int, *,
                  drop_long: bool = False) -> tuple[list[PackedRow], PackingStats]:
    """Best-fit-decreasing packing of ``{"input_ids", "labels"}`` examples into rows of <= max_seq_length.

    Each example becomes one document; see ``PackedRow`` for the row layout. Empty examples are
    skipped; longer ones raise ``ValueError`` unless ``drop_long`` (then skipped); both are counted.
    """
    _check_max(max_seq_length)
    docs, n_dropped, n_empty = [], 0, 0
    for i, ex in enumerate(examples):
        ids, labels = _fields(ex, "", f"example {i}")
        if len(ids) == 0:
            n_empty += 1
        elif len(ids) > max_seq_length:
            if not drop_long:
                raise _too_long(f"example {i}", len(ids), max_seq_length)
            n_dropped += 1
        else:
            docs.append((ids, labels, i, None))
    return _pack(docs, len(examples), max_seq_length, n_dropped, n_empty)


def pack_pairs(pairs: Sequence[dict], max_seq_length: int, *,
               drop_long: bool = False) -> tuple[list[PackedRow], PackingStats]:
    """Pack preference pairs: chosen and rejected become two documents (possibly in different rows).

    Each pair has ``chosen_input_ids``, ``chosen_labels``, ``rejected_input_ids``, ``rejected_labels``.
    Rows carry per document ``example_index`` (the pair) and ``role`` (0 chosen, 1 rejected). A pair
    with an empty side is skipped; one with a side over max_seq_length raises ``ValueError`` unless
    ``drop_long`` (then the whole pair is skipped). Stats count pairs, except ``n_docs``.
    """
    _check_max(max_seq_length)
    docs, n_dropped, n_empty = [], 0, 0
    for i, pair in enumerate(pairs):
        sides = [(role, name, *_fields(pair, f"{name}_", f"pair {i}"))
                 for role, name in ((CHOSEN, "chosen"), (REJECTED, "rejected"))]
        too_long = [(name, len(ids)) for _, name, ids, _ in sides if len(ids) > max_seq_length]
        if any(len(ids) == 0 for _, _, ids, _ in sides):
            n_empty += 1
        elif too_long:
            if not drop_long:
                raise _too_long(f"pair {i}'s {too_long[0][0]}", too_long[0][1], max_seq_length)
            n_dropped += 1
        else:
            docs.extend((ids, labels, i, role) for role, _, ids, labels in sides)
    # pairs are usually packed a micro-batch at a time: one line per batch would drown the log
    return _pack(docs, len(pairs), max_seq_length, n_dropped, n_empty, logging.DEBUG)


def collate_packed(rows: Sequence[PackedRow], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Stack packed rows into ``(batch, L)`` tensors, L = longest row; no ``attention_mask`` on purpose.

    Returns ``input_ids``, ``labels``, ``position_ids`` ``(batch, L)``; padding at the end is
    ``pad_token_id`` / -100 / positions 0, 1, 2... (its own document, apart from the last real one).
    Run the model as ``model(input_ids=..., position_ids=..., use_cache=False)``.

    Per-document regrouping: ``doc_index`` ``(batch, L)`` long gives each token a batch-global
    document id (row-major order; -1 on padding); ``doc_example_index`` ``(n_docs,)`` maps a document
    id to its input example and, for rows from ``pack_pairs``, ``doc_role`` ``(n_docs,)`` to 0 chosen /
    1 rejected. With per-token log-probs aligned to their targets (``logps[:, t]`` = log p of
    ``labels[:, t + 1]``, shape ``(batch, L - 1)``), since first labels are -100 every trained
    target lies in its own document::

        mask = batch["labels"][:, 1:] != -100
        per_doc = torch.zeros(n_docs).index_add_(0, batch["doc_index"][:, 1:][mask], logps[mask])
    """
    if not rows:
        raise ValueError("collate_packed got an empty list of rows")
    has_role = ["role" in row for row in rows]
    if any(has_role) and not all(has_role):
        raise ValueError("collate_packed got rows from pack_pairs mixed with rows from pack_examples; "
                         "batch them separately")
    width = max(len(row["input_ids"]) for row in rows)
    out = {k: torch.empty(len(rows), width, dtype=torch.long)
           for k in ("input_ids", "labels", "position_ids", "doc_index")}
    doc_example, doc_role, n_docs = [], [], 0
    for b, row in enumerate(rows):
        n, pad = len(row["input_ids"]), width - len(row["input_ids"])
        out["input_ids"][b] = torch.tensor(row["input_ids"] + [pad_token_id] * pad)
        out["labels"][b] = torch.tensor(row["labels"] + [IGNORE_INDEX] * pad)
        out["position_ids"][b] = torch.tensor(row["position_ids"] + list(range(pad)))
        lengths = torch.tensor(row["doc_lengths"])
        if int(lengths.sum()) != n:
            raise ValueError(f"row {b}: doc_lengths sum to {int(lengths.sum())} but it has {n} tokens; "
                             f"rows must come from pack_examples or pack_pairs")
        ids = torch.arange(n_docs, n_docs + len(lengths)).repeat_interleave(lengths)
        out["doc_index"][b] = torch.cat([ids, torch.full((pad,), -1)])
        n_docs += len(lengths)
        doc_example.extend(row["example_index"])
        doc_role.extend(row.get("role", []))
    out["doc_example_index"] = torch.tensor(doc_example, dtype=torch.long)
    if all(has_role):
        out["doc_role"] = torch.tensor(doc_role, dtype=torch.long)
    return out


def collate_flat(rows: Sequence[PackedRow]) -> dict[str, torch.Tensor]:
    """Concatenate packed rows into one row with no padding: ``(1, T)`` tensors, T = their real tokens.

    The padding-free layout for training: ``input_ids``, ``labels``, ``position_ids``, ``doc_index``
    ``(1, T)`` and ``doc_example_index`` (``doc_role`` for pairs) as in :func:`collate_packed`, plus the
    document boundaries ``cu_seq_lens_q`` = ``cu_seq_lens_k`` ``(n_docs + 1,)`` int32 (cumulative lengths
    from 0). Pass those two to the model's forward (as :class:`minift.train.forward.CausalLMLoss` does): minift's
    ``minift_sdpa`` attention and transformers' ``flash_attention_2`` then attend within each document
    without a mask; ``sdpa`` / ``eager`` stay correct through the restarting ``position_ids`` alone.
    """
    batch = collate_packed(rows, pad_token_id=0)
    real = batch["doc_index"] >= 0
    for key in ("input_ids", "labels", "position_ids", "doc_index"):
        batch[key] = batch[key][real][None]
    lengths = torch.tensor([n for row in rows for n in row["doc_lengths"]], dtype=torch.int32)
    bounds = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    bounds[1:] = lengths.cumsum(0)
    batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = bounds
    return batch


def collate_padded(examples: Sequence[dict], pad_token_id: int, *,
                   pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad ``{"input_ids", "labels"}`` examples to ``(batch, L)``: input_ids, attention_mask, labels.

    L = the longest example, rounded up to ``pad_to_multiple_of``. Padding gets ``pad_token_id``,
    attention_mask 0 and labels -100.
    """
    if not examples:
        raise ValueError("collate_padded got an empty list of examples")
    if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be None or >= 1, got {pad_to_multiple_of}")
    fields = [_fields(ex, "", f"example {b} of the batch") for b, ex in enumerate(examples)]
    width = max(len(ids) for ids, _ in fields)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(len(examples), width, dtype=torch.long)
    for b, (ids, labs) in enumerate(fields):
        input_ids[b, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[b, :len(ids)] = torch.tensor(labs, dtype=torch.long)
        attention_mask[b, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
