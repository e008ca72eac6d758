"""Packing: packed forward == per-document forward, label boundaries, bin packing, collators, batching."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from minift.constants import IGNORE_INDEX
from minift.data.packing import (
    best_fit_decreasing,
    collate_packed,
    collate_padded,
    pack_examples,
    pack_pairs,
)

PAD = 0


def _docs(lengths, seed=0, prompt=None):
    """Random token documents; labels = tokens, the first ``prompt[i]`` of them masked (-100)."""
    g = torch.Generator().manual_seed(seed)
    prompt = prompt or [0] * len(lengths)
    out = []
    for n, p in zip(lengths, prompt):
        ids = torch.randint(3, 800, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * p + ids[p:]})
    return out


def _lognormal_lengths(n, seed):
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(200), 0.9, n).astype(int), 20, 1000).tolist()


# ---------------------------------------------------------------- packed == unpacked, with a real model

# Two rows of 24 after best-fit-decreasing: [11, 9, 4] (full) + [7, 5] (padded by 12 in the batch).
LENGTHS, MAX_LEN = [7, 11, 5, 9, 4], 24


@pytest.fixture(params=["sdpa", "eager"])
def model_by_attn(request, tiny_dir):
    from minift.model.load import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(str(tiny_dir), dtype="float32", attn_implementation=request.param)
    assert model.config._attn_implementation == request.param
    return model.eval()


def _packed_batch(examples):
    rows, stats = pack_examples(examples, MAX_LEN)
    assert stats.n_rows == 2 and [len(r["input_ids"]) for r in rows] == [24, 12]  # padding is exercised
    return collate_packed(rows, pad_token_id=PAD)


def test_packed_logits_equal_each_document_alone(model_by_attn):
    examples = _docs(LENGTHS)
    batch = _packed_batch(examples)
    assert "attention_mask" not in batch
    with torch.no_grad():
        packed = model_by_attn(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                               use_cache=False).logits
        for doc, example in enumerate(batch["doc_example_index"].tolist()):
            alone = model_by_attn(input_ids=torch.tensor([examples[example]["input_ids"]]), use_cache=False).logits[0]
            # logits are ~15 in size: rtol 1e-6 is a few fp32 ulps; attention leaking across documents gives ~1
            torch.testing.assert_close(packed[batch["doc_index"] == doc], alone, atol=1e-5, rtol=1e-6)


def test_packed_loss_is_the_sum_of_per_document_losses(model_by_attn):
    # Documents 0, 2, 4 train from their first token on: any cross-boundary target would add a term.
    examples = _docs(LENGTHS, seed=1, prompt=[0, 3, 0, 4, 0])
    batch = _packed_batch(examples)
    with torch.no_grad():
        logits = model_by_attn(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                               use_cache=False).logits
        packed = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="sum")
        alone = 0.0
        for ex in examples:
            lg = model_by_attn(input_ids=torch.tensor([ex["input_ids"]]), use_cache=False).logits[0]
            alone += F.cross_entropy(lg[:-1], torch.tensor(ex["labels"][1:]), reduction="sum")
    n_trained = sum(sum(label != IGNORE_INDEX for label in ex["labels"][1:]) for ex in examples)
    assert int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) == n_trained
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=0)


# ---------------------------------------------------------------- row layout

def test_first_label_of_every_document_is_ignored_and_labels_stay_inside_documents():
    examples = _docs([5, 3, 8, 2, 6], seed=2)  # every label trained in the input
    rows, _ = pack_examples(examples, 12)
    for row in rows:
        start = 0
        for n, example in zip(row["doc_lengths"], row["example_index"]):
            assert row["labels"][start] == IGNORE_INDEX
            assert row["labels"][start + 1:start + n] == examples[example]["input_ids"][1:]
            assert row["input_ids"][start:start + n] == examples[example]["input_ids"]
            assert row["position_ids"][start:start + n] == list(range(n))
            start += n
        assert start == len(row["input_ids"])


def test_collate_packed_pads_as_a_separate_document():
    rows, _ = pack_examples(_docs([4, 3, 2]), 7)  # [4, 3] and [2]
    batch = collate_packed(rows, pad_token_id=PAD)
    assert set(batch) == {"input_ids", "labels", "position_ids", "doc_index", "doc_example_index"}
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2], [0, 1, 0, 1, 2, 3, 4]]
    assert batch["doc_index"].tolist() == [[0, 0, 0, 0, 1, 1, 1], [2, 2, -1, -1, -1, -1, -1]]
    assert batch["doc_example_index"].tolist() == [0, 1, 2]
    assert batch["input_ids"][1, 2:].tolist() == [PAD] * 5
    assert batch["labels"][1, 2:].tolist() == [IGNORE_INDEX] * 5


# ---------------------------------------------------------------- properties

examples_strategy = st.lists(
    st.lists(st.tuples(st.integers(3, 50), st.booleans()), min_size=0, max_size=20).map(
        lambda toks: {"input_ids": [t for t, _ in toks], "labels": [t if keep else IGNORE_INDEX for t, keep in toks]}),
    min_size=0, max_size=25)


@settings(max_examples=150, deadline=None)
@given(examples=examples_strategy, max_len=st.integers(1, 30))
def test_packing_preserves_every_token_and_document_structure(examples, max_len):
    rows, stats = pack_examples(examples, max_len, drop_long=True)
    kept = [i for i, ex in enumerate(examples) if 0 < len(ex["input_ids"]) <= max_len]
    expected = Counter((i, p, t) for i in kept for p, t in enumerate(examples[i]["input_ids"]))
    seen = Counter()
    for row in rows:
        assert 0 < len(row["input_ids"]) <= max_len
        assert len(row["labels"]) == len(row["position_ids"]) == len(row["input_ids"]) == sum(row["doc_lengths"])
        start = 0
        for n, i in zip(row["doc_lengths"], row["example_index"]):
            assert row["position_ids"][start:start + n] == list(range(n))
            assert row["labels"][start:start + n] == [IGNORE_INDEX] + examples[i]["labels"][1:]
            seen.update((i, p, t) for p, t in enumerate(row["input_ids"][start:start + n]))
            start += n
    assert seen == expected
    assert stats.n_docs == len(kept) and stats.n_rows == len(rows)
    assert stats.n_empty == sum(not ex["input_ids"] for ex in examples)
    assert stats.n_dropped == sum(len(ex["input_ids"]) > max_len for ex in examples)
    assert stats.real_tokens == sum(expected.values()) and stats.capacity == len(rows) * max_len


def _naive_best_fit_decreasing(lengths, capacity):
    rooms = []
    for n in sorted(lengths, reverse=True):
        fits = [k for k, room in enumerate(rooms) if room >= n]
        if fits:
            k = min(fits, key=lambda k: rooms[k])
            rooms[k] -= n
        else:
            rooms.append(capacity - n)
    return sorted(rooms)


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), max_size=60), capacity=st.integers(40, 64))
def test_best_fit_decreasing_matches_the_quadratic_definition(lengths, capacity):
    bins = best_fit_decreasing(lengths, capacity)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    # Tie-breaking can pick different bins, but the multiset of leftover room is fixed by the rule.
    assert sorted(capacity - sum(lengths[i] for i in b) for b in bins) == _naive_best_fit_decreasing(lengths, capacity)


def test_packing_is_deterministic_and_efficient_on_a_realistic_mix():
    lengths = _lognormal_lengths(2000, seed=0)
    examples = [{"input_ids": [5] * n, "labels": [5] * n} for n in lengths]
    rows, stats = pack_examples(examples, 2048)
    assert stats.efficiency == sum(lengths) / (len(rows) * 2048)
    assert stats.efficiency >= 0.95, str(stats)
    assert pack_examples(examples, 2048)[0] == rows
    assert "rows" in str(stats) and f"{stats.efficiency:.1%}" in str(stats)


# ---------------------------------------------------------------- preference pairs

def test_pack_pairs_regroups_per_pair_sums_exactly():
    rng = random.Random(0)
    pairs = []
    for _ in range(9):
        sides = {}
        for name in ("chosen", "rejected"):
            n, p = rng.randint(2, 14), rng.randint(0, 3)
            ids = [rng.randint(3, 99) for _ in range(n)]
            sides[f"{name}_input_ids"], sides[f"{name}_labels"] = ids, [IGNORE_INDEX] * min(p, n) + ids[p:]
        pairs.append(sides)
    rows, stats = pack_pairs(pairs, 16)
    assert stats.n_examples == 9 and stats.n_docs == 18 and stats.n_rows < 18
    batch = collate_packed(rows, pad_token_id=PAD)
    # Stand-in "log-probs": the target token id at each trained target position (exact in float64).
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    per_doc = torch.zeros(len(batch["doc_example_index"]), dtype=torch.float64).index_add_(
        0, batch["doc_index"][:, 1:][mask], targets[mask].double())
    per_pair = torch.zeros(len(pairs), 2, dtype=torch.float64)
    per_pair[batch["doc_example_index"], batch["doc_role"]] = per_doc
    expected = [[sum(t for t in pair[f"{name}_labels"][1:] if t != IGNORE_INDEX) for name in ("chosen", "rejected")]
                for pair in pairs]
    assert per_pair.tolist() == expected
    assert sorted(zip(batch["doc_example_index"].tolist(), batch["doc_role"].tolist())) == \
        [(i, r) for i in range(9) for r in (0, 1)]


def test_pack_pairs_errors_name_the_pair_and_side():
    pair = {"chosen_input_ids": [1] * 5, "chosen_labels": [1] * 5, "rejected_input_ids": [1] * 30,
            "rejected_labels": [1] * 30}
    with pytest.raises(ValueError, match=r"pair 1's rejected has 30 tokens.*max_seq_length=20"):
        pack_pairs([dict(pair, rejected_input_ids=[1] * 3, rejected_labels=[1] * 3), pair], 20)
    rows, stats = pack_pairs([pair, dict(pair, rejected_input_ids=[], rejected_labels=[])], 20, drop_long=True)
    assert rows == [] and stats.n_dropped == 1 and stats.n_empty == 1


# ---------------------------------------------------------------- errors

def test_over_long_example_is_an_error_naming_index_and_lengths():
    examples = _docs([5, 9, 13, 4])
    with pytest.raises(ValueError, match=r"example 2 has 13 tokens, more than max_seq_length=10.*drop_long=True"):
        pack_examples(examples, 10)
    rows, stats = pack_examples(examples + [{"input_ids": [], "labels": []}], 10, drop_long=True)
    assert (stats.n_examples, stats.n_docs, stats.n_dropped, stats.n_empty) == (5, 3, 1, 1)
    assert sorted(i for row in rows for i in row["example_index"]) == [0, 1, 3]


def test_malformed_examples_say_what_is_wrong():
    with pytest.raises(ValueError, match=r"example 1 has 3 input_ids but 2 labels"):
        pack_examples([{"input_ids": [1], "labels": [1]}, {"input_ids": [1, 2, 3], "labels": [1, 2]}], 8)
    with pytest.raises(ValueError, match=r"example 0 has no 'labels'"):
        pack_examples([{"input_ids": [1, 2]}], 8)
    with pytest.raises(ValueError, match="max_seq_length must be >= 1"):
        pack_examples([], 0)


# ---------------------------------------------------------------- padded collator

def test_collate_padded_right_pads():
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = collate_padded(examples, pad_token_id=PAD)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, PAD, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    batch = collate_padded(examples, pad_token_id=PAD, pad_to_multiple_of=4)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, 4)
    assert batch["attention_mask"].sum().item() == 4 and batch["labels"][:, 3].tolist() == [-100, -100]
