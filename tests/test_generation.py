"""The generation engine (minift/train/sampling.py) and the named-adapter API (minift/infer/engine.py)."""

from __future__ import annotations

import pytest
import torch

from minift.infer.engine import Generator, parse_adapter_specs
from minift.lora.layers import disable_adapters
from minift.lora.merge import merge_and_save
from minift.model.attention import use_document_attention
from minift.model.load import load_model_and_tokenizer
from minift.train.sampling import SamplingParams, row_seed, sample

PROMPTS = ["Reverse the words: red cup", "hello there", "one two three four five six seven"]
GREEDY = SamplingParams(max_new_tokens=24)


@pytest.fixture(scope="module")
def gen(tiny_dir, random_adapters):
    return Generator.load(str(tiny_dir), {"a": str(random_adapters / "a"), "b": str(random_adapters / "b")})


def texts(completions):
    return [c.text for c in completions]


def test_greedy_equals_transformers_generate(tiny_dir, gpt2_dir):
    """Our KV-cache loop (left padding, rows leaving the batch as they end, a cache that grows 32 positions at a
    time and is filled in place: 40 new tokens cross a boundary) gives HF generate's greedy tokens, for Llama and
    GPT-2 (Conv1D, learned positions)."""
    for path in (tiny_dir, gpt2_dir):
        model, tok = load_model_and_tokenizer(str(path))
        prompts = [tok(p)["input_ids"] for p in PROMPTS]
        ours = sample(model, tok, prompts, SamplingParams(max_new_tokens=40))
        assert max(len(p) + len(c.token_ids) for p, c in zip(prompts, ours)) > 32
        for p, c in zip(prompts, ours):
            ref = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 max_new_tokens=40, do_sample=False, pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
            assert c.token_ids == ref[: len(c.token_ids)] and len(ref) == len(c.token_ids), path.name


def test_completions_share_their_prompts_cache(tiny_dir, monkeypatch):
    """On ``minift_sdpa`` (how training loads a model), the n completions of a prompt read one copy of its cached
    keys and values once the copies would be large: every decoding step's attention gets the 3 prompts' cache, not
    12 rows of it (these short prompts get a copy per row by default). Each sampled token's log-prob equals the
    model's on the whole text in one forward, so every step attended to the right keys (grouped-query heads; rows
    leaving the batch at different lengths, one at EOS)."""
    import minift.model.attention as attention
    import minift.train.sampling as sampling

    model, tok = load_model_and_tokenizer(str(tiny_dir))
    assert use_document_attention(model) and model.config.num_key_value_heads < model.config.num_attention_heads
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    params = [SamplingParams(max_new_tokens=k, temperature=1.0, seed=i) for i, k in enumerate((5, 45, 20))]
    prompt_rows, shared_attention = [], attention._shared_prefix_attention
    monkeypatch.setattr(attention, "_shared_prefix_attention",
                        lambda *args: prompt_rows.append(len(args[-1][0])) or shared_attention(*args))
    sample(model, tok, prompts, params, n=4)
    assert prompt_rows == []
    monkeypatch.setattr(sampling, "SHARE_FROM", 0)
    shared = sample(model, tok, prompts, params, n=4)
    assert set(prompt_rows) == {3} and len(prompt_rows) == 44 * model.config.num_hidden_layers
    assert len({len(c.token_ids) for c in shared}) >= 3 and any(c.finish_reason == "stop" for c in shared)
    for c in shared:
        assert torch.allclose(torch.tensor(c.logprobs), one_forward_logprobs(model, c), atol=1e-5)


def one_forward_logprobs(model, c) -> torch.Tensor:
    """The log-probs of completion ``c``'s tokens in one forward over its prompt and tokens (temperature 1)."""
    with torch.no_grad():
        full = model(input_ids=torch.tensor([c.prompt_ids + c.token_ids])).logits[0].float().log_softmax(-1)
    n = len(c.prompt_ids)
    return full[n - 1: n - 1 + len(c.token_ids)].gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]


def test_adapter_equals_merged_model_and_switching_restores_outputs(gen, tiny_dir, random_adapters, tmp_path):
    """Generation with adapter ``a`` gives the tokens of the model with ``a`` merged; switching to ``b`` and the
    base changes them, and switching back restores them, with the same base weights in memory (no reload)."""
    merged_dir = merge_and_save(str(tiny_dir), [random_adapters / "a"], tmp_path / "merged")
    merged = Generator.load(str(merged_dir))
    weight = gen.model.get_input_embeddings().weight
    pointer = weight.data_ptr()
    first = gen.generate(PROMPTS, GREEDY, adapter="a")
    assert [c.token_ids for c in first] == [c.token_ids for c in merged.generate(PROMPTS, GREEDY)]
    other, base = texts(gen.generate(PROMPTS, GREEDY, adapter="b")), texts(gen.generate(PROMPTS, GREEDY))
    assert len({tuple(texts(first)), tuple(other), tuple(base)}) == 3
    assert texts(gen.generate(PROMPTS, GREEDY, adapter="a")) == texts(first)
    assert texts(gen.generate(PROMPTS, GREEDY)) == base
    assert gen.model.get_input_embeddings().weight.data_ptr() == pointer


def test_merge_for_speed_gives_the_same_tokens(tiny_dir, random_adapters, gen):
    fast = Generator.load(str(tiny_dir), {"a": str(random_adapters / "a"), "b": str(random_adapters / "b")}, merge=True)
    for name in ("a", "b", "base", "a"):
        assert texts(fast.generate(PROMPTS, GREEDY, adapter=name)) == texts(gen.generate(PROMPTS, GREEDY, adapter=name))
        assert fast.merged == (None if name == "base" else name)


def test_adapters_load_and_unload_at_runtime(gen, random_adapters):
    before = texts(gen.generate(PROMPTS, GREEDY, adapter="a"))
    gen.add_adapter("a2", random_adapters / "a")
    assert gen.names == ["base", "a", "b", "a2"]
    assert texts(gen.generate(PROMPTS, GREEDY, adapter="a2")) == before
    gen.remove_adapter("a2")
    assert gen.names == ["base", "a", "b"]
    assert texts(gen.generate(PROMPTS, GREEDY, adapter="a")) == before
    with pytest.raises(ValueError, match="no model or adapter named 'a2'; loaded: base, a, b"):
        gen.generate(PROMPTS, GREEDY, adapter="a2")


def test_logprobs_are_the_models(gen):
    """Each token's log-prob (and its top alternatives) equals log_softmax of one full forward over prompt +
    completion, at temperature 1, whatever the sampling temperature."""
    [c] = gen.generate(PROMPTS[:1], SamplingParams(max_new_tokens=12, temperature=0.8, top_logprobs=3, seed=1),
                       adapter="a")
    ids = torch.tensor([c.prompt_ids + c.token_ids])
    with torch.no_grad(), disable_adapters(gen.model, ["b"]):
        full = gen.model(input_ids=ids).logits[0].float().log_softmax(-1)
    n = len(c.prompt_ids)
    expected = full[n - 1: n - 1 + len(c.token_ids)]
    assert torch.allclose(torch.tensor(c.logprobs), expected.gather(1, torch.tensor(c.token_ids)[:, None])[:, 0], atol=2e-5)
    for t, top in enumerate(c.top_logprobs):
        values, indices = expected[t].topk(3)
        assert [i for i, _ in top] == indices.tolist()
        assert torch.allclose(torch.tensor([v for _, v in top]), values, atol=2e-5)


def test_sampling_is_deterministic_per_completion(gen):
    """Completion j of a prompt depends only on (seed, j): not on n, on the other prompts of the batch, or on
    their options; different j differ; top_k 1 and a tiny top_p are greedy."""
    hot = SamplingParams(max_new_tokens=16, temperature=1.5, top_p=0.95, top_k=50, min_p=0.01, seed=7)
    together = gen.generate(PROMPTS, [hot, GREEDY, hot], n=4)
    alone = gen.generate(PROMPTS[2:], hot, n=2)
    assert [c.token_ids for c in together[8:10]] == [c.token_ids for c in alone]
    assert len({tuple(c.token_ids) for c in together[:4]}) >= 3
    assert len({tuple(c.token_ids) for c in together[4:8]}) == 1  # the greedy prompt's four copies
    for narrow in (SamplingParams(max_new_tokens=16, temperature=1.0, top_k=1, seed=3),
                   SamplingParams(max_new_tokens=16, temperature=1.0, top_p=1e-6, seed=3)):
        assert texts(gen.generate(PROMPTS, narrow)) == texts(gen.generate(PROMPTS, SamplingParams(max_new_tokens=16)))
    assert row_seed(7, 0) != row_seed(7, 1) and row_seed(1, 2, 3) == row_seed(1, 2, 3)


def test_unfiltered_sampling_draws_from_the_softmax():
    """Rows without top-k / top-p / min-p invert the CDF in vocabulary order (no sort): token frequencies over many
    draws match softmax(logits / temperature), and a token of probability 0 is never drawn, even by a draw of 0."""
    from minift.train.sampling import _draw_plain, _invert

    logits = torch.tensor([[2.0, float("-inf"), 0.0, 1.0, -1.0]])
    probs = (logits / 0.7).softmax(-1)[0]
    draws = torch.rand(20000, 1, generator=torch.Generator().manual_seed(0))
    picks = _draw_plain(logits.expand(20000, -1) / 0.7, draws)
    freq = torch.bincount(picks, minlength=5).double() / len(picks)
    assert (freq - probs.double()).abs().max() < 0.01 and freq[1] == 0
    assert _invert(torch.tensor([[0.0, 0.0, 0.5, 1.0]]), torch.zeros(1, 1)).item() == 2


def test_a_token_far_below_the_others_gets_its_exact_logprob():
    """A token drawn at a high temperature whose probability at temperature 1 underflows float32 (here e^-200)
    still gets its log-probability, -200, not -inf; the others the log of their softmax."""
    from minift.train.sampling import _chosen_logprobs

    logits = torch.tensor([[0.0, -200.0, -1.0], [0.0, -1.0, -2.0]])
    tokens = torch.tensor([1, 2])
    expected = logits.double().log_softmax(-1).gather(1, tokens[:, None]).squeeze(1)
    chosen = _chosen_logprobs(logits, logits.softmax(-1), tokens)
    assert torch.allclose(chosen.double(), expected, atol=1e-5)
    assert torch.allclose(_chosen_logprobs(logits[1:], logits[1:].softmax(-1), tokens[1:]).double(), expected[1:])


@pytest.mark.parametrize("vocab", [5, 256, 300, 49152])
def test_the_cdf_is_inverted_block_by_block_as_over_the_whole_vocabulary(vocab):
    """The sampler finds a draw's token block by block (block sums, then one block): the same index as a search of
    the whole vocabulary's running sum in float64, for vocabularies of part of a block, one, several and a partial
    last block; with zero weights, peaked weights, draws of 0 and just under 1; never a token of weight 0."""
    from minift.train.sampling import _invert

    g = torch.Generator().manual_seed(vocab)
    for peak in (1, 8):
        weights = torch.rand(64, vocab, generator=g) ** peak
        weights[weights < 0.3 ** peak] = 0
        weights[:, -1] += weights.sum(-1) == 0  # every row has some weight
        draws = torch.rand(64, 1, generator=g)
        draws[0], draws[1] = 0.0, 1 - 2 ** -24
        running = weights.double().cumsum(-1)
        expected = torch.searchsorted(running, draws.double() * running[:, -1:], right=True).squeeze(1)
        picked = _invert(weights, draws)
        assert torch.equal(picked, expected)
        assert (weights.gather(1, picked[:, None]) > 0).all()


def test_rows_of_different_lengths_leave_the_batch(gen):
    """A batch whose rows stop at different budgets equals each row generated alone."""
    budgets = [SamplingParams(max_new_tokens=k) for k in (3, 30, 11)]
    together = gen.generate(PROMPTS, budgets, adapter="b")
    for prompt, params, c in zip(PROMPTS, budgets, together):
        [single] = gen.generate([prompt], params, adapter="b")
        assert c.token_ids == single.token_ids and len(c.token_ids) <= params.max_new_tokens
        assert c.finish_reason == ("length" if len(c.token_ids) == params.max_new_tokens else "stop")


def test_stop_strings_and_streaming(gen):
    """A stop string ends the completion and is cut from the text; the streamed pieces add up to the final text
    and never show any part of the stop string, and each completion's end is reported once."""
    [plain] = gen.generate(PROMPTS[1:2], SamplingParams(max_new_tokens=30), adapter="a")
    assert len(plain.text) > 8, plain.text
    stop = plain.text[5:8]
    pieces, ends = [], []
    params = SamplingParams(max_new_tokens=30, stop=(stop, "never-appears"))
    [c] = gen.generate(PROMPTS[1:2], params, adapter="a",
                       on_text=lambda k, text, done: (pieces.append(text), done and ends.append(done)))
    assert c.text == plain.text[: plain.text.index(stop)] and c.finish_reason == "stop"
    assert "".join(pieces) == c.text and ends == [c]
    assert c.token_ids == plain.token_ids[: len(c.token_ids)]


def test_bad_input_is_refused_clearly(gen, random_adapters, tiny_dir):
    with pytest.raises(ValueError, match="different base model"):
        gen.add_adapter("g", random_adapters / "gpt2")
    assert gen.names == ["base", "a", "b"]
    with pytest.raises(ValueError, match="already loaded"):
        gen.add_adapter("a", random_adapters / "a")
    with pytest.raises(FileNotFoundError, match="holds no adapter_config.json"):
        parse_adapter_specs([f"x={tiny_dir}"])
    a, b = str(random_adapters / "a"), str(random_adapters / "b")
    assert parse_adapter_specs([f"s={a}", b]) == {"s": a, "b": b}
    with pytest.raises(ValueError, match="reserved for the base"):
        parse_adapter_specs([f"base={random_adapters / 'a'}"])
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="at least one token"):
        sample(gen.model, gen.tokenizer, [[]], GREEDY)


def test_evaluation_generation_shows_its_progress(tiny_dir, capsys):
    """An evaluation's greedy generation (minutes on a real model) counts its prompts on a bar named after the
    metric it measures, ends with every prompt counted, and returns what it returns without a bar."""
    from minift.train.generation import answer_metrics, generate

    model, tok = load_model_and_tokenizer(str(tiny_dir))
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    plain = generate(model, tok, prompts, max_new_tokens=8, batch_size=2)
    assert "prompt" not in capsys.readouterr().err
    assert generate(model, tok, prompts, max_new_tokens=8, batch_size=2, desc="checking") == plain
    err = capsys.readouterr().err
    assert "checking" in err and "3/3" in err, err
    examples = [{"input_ids": p, "answer": "x"} for p in prompts]
    assert answer_metrics(model, tok, examples, max_new_tokens=8, suffix="_before") == {"answer_accuracy_before": 0.0}
    err = capsys.readouterr().err
    assert "answer_accuracy_before" in err and "3/3" in err, err
