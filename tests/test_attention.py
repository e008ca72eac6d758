"""Document attention on flat packed batches: equal to each document alone, no mask, sdpa unchanged otherwise."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minift.constants import IGNORE_INDEX
from minift.data.packing import collate_flat, collate_padded, pack_examples
from minift.lora.config import LoraConfig
from minift.lora.layers import apply_lora
from minift.model.attention import NAME, flat_forward, use_document_attention
from minift.train.forward import CausalLMLoss

LENGTHS = [7, 11, 5, 9, 4]


def _docs(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": (ids := torch.randint(3, 800, (n,), generator=g).tolist()), "labels": list(ids)}
            for n in lengths]


def _flat(examples, max_len=24):
    rows, stats = pack_examples(examples, max_len)
    assert stats.n_rows == 2  # two packed rows become one flat row
    return collate_flat(rows)


def _model(path, attn):
    from minift.model.load import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(str(path), dtype="float32", attn_implementation=attn)
    return model.eval()


def _forward(model, batch):
    bounds = batch["cu_seq_lens_q"]
    longest = int((bounds[1:] - bounds[:-1]).max())
    with flat_forward():
        return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                     cu_seq_lens_q=bounds, cu_seq_lens_k=bounds, max_length_q=longest, max_length_k=longest).logits


def test_collate_flat_is_one_padding_free_row():
    examples = _docs(LENGTHS)
    batch = _flat(examples)
    assert batch["input_ids"].shape == (1, sum(LENGTHS)) and "attention_mask" not in batch
    bounds = batch["cu_seq_lens_q"]
    assert bounds.dtype == torch.int32 and bounds[0] == 0 and bounds[-1] == sum(LENGTHS)
    for doc, example in enumerate(batch["doc_example_index"].tolist()):
        start, end = bounds[doc].item(), bounds[doc + 1].item()
        assert batch["input_ids"][0, start:end].tolist() == examples[example]["input_ids"]
        assert batch["position_ids"][0, start:end].tolist() == list(range(end - start))
        assert (batch["doc_index"][0, start:end] == doc).all()
        assert batch["labels"][0, start] == IGNORE_INDEX  # never trained on the previous document's last token
        assert batch["labels"][0, start + 1:end].tolist() == examples[example]["input_ids"][1:]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("attn", [NAME, "sdpa", "eager"])
def test_flat_logits_equal_each_document_alone(arch, attn, tiny_dir, gpt2_dir):
    """minift_sdpa separates documents by cu_seq_lens; sdpa and eager by the restarting position_ids."""
    model = _model(tiny_dir if arch == "llama" else gpt2_dir, "sdpa" if attn == NAME else attn)
    if attn == NAME:
        assert use_document_attention(model) and model.config._attn_implementation == NAME
    examples = _docs(LENGTHS)
    batch = _flat(examples)
    with torch.no_grad():
        flat = _forward(model, batch)[0]
        for doc, example in enumerate(batch["doc_example_index"].tolist()):
            alone = model(input_ids=torch.tensor([examples[example]["input_ids"]]), use_cache=False).logits[0]
            torch.testing.assert_close(flat[batch["doc_index"][0] == doc], alone, atol=2e-5, rtol=0)


def test_no_mask_is_built_and_attention_runs_per_document(tiny_dir, monkeypatch):
    import transformers.masking_utils as masking

    model = _model(tiny_dir, "sdpa")
    use_document_attention(model)
    built, calls = [], []
    real_mask, real_sdpa = masking.sdpa_mask, F.scaled_dot_product_attention
    monkeypatch.setattr(masking, "sdpa_mask", lambda *a, **k: built.append(1) or real_mask(*a, **k))

    def spy(q, k, v, **kw):
        calls.append((q.shape[2], kw.get("attn_mask") is None and kw.get("is_causal")))
        return real_sdpa(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        _forward(model, _flat(_docs(LENGTHS)))
    assert not built
    layers = model.config.num_hidden_layers
    assert sorted(calls) == sorted((n, True) for n in LENGTHS for _ in range(layers))
    calls.clear()
    with torch.no_grad():  # outside flat batches it is plain sdpa: padded rows get their mask
        padded = collate_padded(_docs([5, 9]), pad_token_id=0)
        model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], use_cache=False)
    assert built and len(calls) == layers and all(n == 9 for n, _ in calls)


def test_outside_flat_batches_it_is_sdpa(tiny_dir):
    """Padded batches give bit-identical logits to sdpa; cached generation (single-query steps) the same tokens."""
    sdpa, ours = _model(tiny_dir, "sdpa"), _model(tiny_dir, "sdpa")
    use_document_attention(ours)
    padded = collate_padded(_docs([5, 9, 3]), pad_token_id=0)
    with torch.no_grad():
        a = sdpa(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], use_cache=False).logits
        b = ours(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], use_cache=False).logits
    assert torch.equal(a, b)
    prompt = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = (prompt != 0).long()
    options = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(sdpa.generate(input_ids=prompt, attention_mask=mask, **options),
                       ours.generate(input_ids=prompt, attention_mask=mask, **options))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_flat_loss_and_lora_gradients_equal_the_per_document_sums(tiny_dir, checkpointing):
    model = _model(tiny_dir, "sdpa")
    use_document_attention(model)
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    examples = _docs(LENGTHS, seed=3)
    loss_model = CausalLMLoss(model)
    ce, count = loss_model(**_flat(examples))
    flat_grads = torch.autograd.grad(ce, params)
    total, n = 0.0, 0
    for ex in examples:
        one = {"input_ids": torch.tensor([ex["input_ids"]]), "labels": torch.tensor([[IGNORE_INDEX] + ex["labels"][1:]])}
        c, k = loss_model(**one)
        total, n = total + c, n + k
    alone_grads = torch.autograd.grad(total, params)
    assert count == n == sum(LENGTHS) - len(LENGTHS)
    torch.testing.assert_close(ce, total, rtol=1e-5, atol=0)
    scale = max(g.abs().max().item() for g in alone_grads)
    worst = max((a - b).abs().max().item() for a, b in zip(flat_grads, alone_grads))
    assert scale > 1e-3 and worst <= 1e-5 * scale, (worst, scale)


def test_bad_flat_batches_fail_clearly(tiny_dir):
    model = _model(tiny_dir, "sdpa")
    use_document_attention(model)
    batch = _flat(_docs(LENGTHS))
    wrong = batch["cu_seq_lens_q"].clone()
    wrong[-1] -= 1
    with pytest.raises(ValueError, match="cu_seq_lens_q must run from 0 to the row length"), torch.no_grad(), \
            flat_forward():
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
              cu_seq_lens_q=wrong, cu_seq_lens_k=wrong)
    two_rows = {k: v.expand(2, -1) for k, v in batch.items() if k in ("input_ids", "position_ids")}
    with pytest.raises(ValueError, match="one flat row"), torch.no_grad(), flat_forward():
        model(**two_rows, use_cache=False, cu_seq_lens_q=batch["cu_seq_lens_q"], cu_seq_lens_k=batch["cu_seq_lens_k"])


def test_other_implementations_are_left_alone(tiny_dir):
    model = _model(tiny_dir, "eager")
    assert not use_document_attention(model) and model.config._attn_implementation == "eager"


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_a_decoding_step_on_shared_prompts_equals_sdpa(dtype, tol):
    """A sampler's decoding step whose rows are completions of 2 prompts (3 each) reads each prompt's keys once:
    equal to SDPA over each row's own copy of its prompt's keys followed by its own, with grouped KV heads, a
    left-padding bool mask, an additive mask, every row present and rows gone. With an argument the shared path
    does not implement (a position bias), the rows' whole caches go to transformers' sdpa: the same result."""
    from minift.model.attention import document_attention_forward

    g = torch.Generator().manual_seed(0)
    prompt_keys, prompt_values = (torch.randn(2, 2, 6, 16, generator=g).to(dtype) for _ in range(2))
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 4, True
    for slots in (torch.arange(6), torch.tensor([0, 2, 5])):
        rows = len(slots)
        q = torch.randn(rows, 8, 1, 16, generator=g).to(dtype)
        k, v = (torch.randn(rows, 2, 4, 16, generator=g).to(dtype) for _ in range(2))
        k.shared_prefix = (prompt_keys.transpose(-1, -2).contiguous(), prompt_values, slots, 3)
        keep = torch.ones(rows, 1, 1, 10, dtype=torch.bool)
        keep[slots < 3, ..., :2] = False  # prompt 0 is left-padded
        keep[:, ..., -1] = False  # the own buffer's unfilled tail
        additive = torch.zeros(rows, 1, 1, 10, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)
        whole_k, whole_v = (torch.cat([prompt[slots // 3], own], dim=2).float().repeat_interleave(4, 1)
                            for prompt, own in ((prompt_keys, k), (prompt_values, v)))
        for mask in (None, keep, additive):
            ref = F.scaled_dot_product_attention(q.float(), whole_k, whole_v, attn_mask=mask if mask is None or
                                                 mask.dtype == torch.bool else mask.float(), scale=0.3)
            ours, _ = document_attention_forward(module, q, k, v, mask, scaling=0.3)
            assert ours.shape == (rows, 1, 8, 16)
            assert (ours.float() - ref.transpose(1, 2)).abs().max() < tol
        bias = torch.zeros(rows, 8, 1, 10, dtype=dtype)
        ours, _ = document_attention_forward(module, q, k, v, keep, scaling=0.3, position_bias=bias)
        ref = F.scaled_dot_product_attention(q.float(), whole_k, whole_v, attn_mask=keep, scale=0.3)
        assert (ours.float() - ref.transpose(1, 2)).abs().max() < tol
