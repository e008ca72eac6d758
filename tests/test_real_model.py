"""Every path once more on a real pretrained model, SmolLM2-135M-Instruct, started from its GGUF file (30 layers, 9 / 3
heads, tied embeddings, a chat template that inserts a default system turn). One SFT run is shared by all tests
(``smollm2_sft`` in conftest)."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from conftest import RECIPES, _ProcessState, load_recipe, logged, start_server
from gguf import GGUFReader
from safetensors.torch import load_file
from test_generation import one_forward_logprobs
from test_gguf import hf_name, hf_weights, tensors, uninterleave

from minift.data.encode import encode_sft
from minift.data.formats import normalize_all
from minift.data.read import Record
from minift.export.gguf.convert import convert
from minift.lora.adapters import load_adapter
from minift.model.attention import use_document_attention
from minift.model.load import load_model_and_tokenizer, load_tokenizer
from minift.train.rewards import load_reward
from minift.train.sampling import SamplingParams, sample

pytestmark = [pytest.mark.real, pytest.mark.slow]

HEADS, KV_HEADS = 9, 3
EVAL_PAIRS = RECIPES / "data" / "demo_eval_pairs.jsonl"
MIXED = ("<|im_start|>user\nRéponds en un mot : 東京は日本の首都です。 Ünïcödé  tabs\t\tand   spaces 1234567 "
         "3.14159 x=y+z; don't you'll 🙂<|im_end|>\n<|im_start|>assistant\n")


def test_sft_learns_the_demo_task(smollm2_sft):
    """0% -> >= 85% held-out exact match in 30 LoRA steps (measured: 95%), the loss falling as it goes."""
    out, result = smollm2_sft
    assert result["answer_accuracy_before"] <= 0.02 and result["answer_accuracy"] >= 0.85, result
    losses = logged(out)
    assert np.mean([losses[s] for s in range(1, 6)]) > 3 * np.mean([losses[s] for s in range(26, 31)]), losses
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["base_model_name_or_path"].endswith(".gguf")


def test_label_mask_under_the_default_system_turn(smollm2_gguf):
    """SmolLM2's template inserts its own system turn; only the assistant answers and their <|im_end|> are trained."""
    tokenizer = load_tokenizer(str(smollm2_gguf))
    records = [{"messages": [{"role": "user", "content": "Reverse the words: red cup"},
                             {"role": "assistant", "content": "cup red"},
                             {"role": "user", "content": "And: a b c"}, {"role": "assistant", "content": "c b a"}]},
               {"prompt": "Reverse the words: x y", "completion": "y x"}]
    examples = normalize_all([Record(r, f"t:{i}") for i, r in enumerate(records)], "sft").examples
    encoded, _ = encode_sft(examples, tokenizer, max_seq_length=256)
    for example, answers in zip(encoded, (["cup red", "c b a"], ["y x"])):
        text = tokenizer.decode(example["input_ids"])
        assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
        pairs = [(i, label) for i, label in zip(example["input_ids"], example["labels"]) if label != -100]
        assert all(i == label for i, label in pairs)  # labels are the tokens themselves (the model shifts them)
        trained = [i for i, _ in pairs]
        expected = sum((tokenizer(a + "<|im_end|>", add_special_tokens=False)["input_ids"] for a in answers), [])
        assert trained == expected, (tokenizer.convert_ids_to_tokens(trained), answers)


def _ids(tokenizer):
    return torch.tensor([tokenizer(MIXED)["input_ids"]])


def test_completions_share_their_prompts_cache_on_smollm2(smollm2_dir, monkeypatch):
    """SmolLM2's completions of a chat prompt (3 KV heads for 9, 30 layers) read one copy of its cache when sharing
    is on, and each sampled token's log-prob equals the model's in one forward over the whole text."""
    import minift.train.sampling as sampling

    model, tok = load_model_and_tokenizer(str(smollm2_dir))
    assert use_document_attention(model)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"] for q in ("Reverse the words: red cup",
                                                                               "What is the capital of France?")]
    monkeypatch.setattr(sampling, "SHARE_FROM", 0)
    layers = []
    real_layer = sampling._SharedPrefixLayer
    monkeypatch.setattr(sampling, "_SharedPrefixLayer", lambda: layers.append(real_layer()) or layers[-1])
    done = sample(model, tok, prompts, SamplingParams(max_new_tokens=12, temperature=1.0, seed=3), n=3)
    assert len(layers) == model.config.num_hidden_layers and all(len(layer.prefix[0]) == 2 for layer in layers)
    for c in done:
        assert torch.allclose(torch.tensor(c.logprobs), one_forward_logprobs(model, c), atol=1e-4)


def test_peft_reads_minift_adapter_and_minift_reads_peft(smollm2_dir, smollm2_sft, tmp_path):
    import peft

    adapter = smollm2_sft[0] / "adapter"
    base, tokenizer = load_model_and_tokenizer(str(smollm2_dir))
    ids = _ids(tokenizer)
    with torch.no_grad():
        plain = base.eval()(ids).logits
        load_adapter(base, adapter)
        ours = base(ids).logits
    theirs_base, _ = load_model_and_tokenizer(str(smollm2_dir))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(theirs_base, str(adapter)).eval()
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    with torch.no_grad():
        theirs_logits = theirs(ids).logits
    assert (ours - plain).abs().max() > 1.0  # the trained adapter changes the model
    torch.testing.assert_close(theirs_logits, ours, atol=1e-4, rtol=0)

    fresh, _ = load_model_and_tokenizer(str(smollm2_dir))
    made = peft.get_peft_model(fresh, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                      init_lora_weights=False)).eval()
    made.save_pretrained(str(tmp_path / "peft"))
    with torch.no_grad():
        expected = made(ids).logits
    mine, _ = load_model_and_tokenizer(str(smollm2_dir))
    load_adapter(mine.eval(), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(mine(ids).logits, expected, atol=1e-4, rtol=0)


def _undo(name: str, x: np.ndarray) -> np.ndarray:
    if ".attn_q." in name:
        return uninterleave(x, HEADS)
    if ".attn_k." in name:
        return uninterleave(x, KV_HEADS)
    return x


def test_gguf_export_merged_lora_and_tokenizer(smollm2_dir, smollm2_sft, tmp_path):
    """The merged GGUF holds the merged weights, the LoRA GGUF holds the adapter (B rows in llama.cpp's Q/K order),
    and transformers' GGUF tokenizer, read from minift's file, gives HF's ids."""
    from transformers import AutoTokenizer

    from minift.lora.merge import merge_and_save

    adapter = smollm2_sft[0] / "adapter"
    merged = merge_and_save(str(smollm2_dir), [adapter], tmp_path / "merged")
    expected = hf_weights(merged)
    written = tensors(GGUFReader(convert(smollm2_dir, tmp_path / "merged.gguf", outtype="f32", adapters=[adapter])))
    # token_embd, output_norm and 9 tensors a layer; no output.weight: the head is tied to token_embd
    assert "output.weight" not in written and len(written) == 2 + 30 * 9
    for name, (_, x) in written.items():
        np.testing.assert_allclose(_undo(name, x), expected[hf_name(name, "llama")], rtol=0, atol=1e-5, err_msg=name)
    base = hf_weights(smollm2_dir)
    assert not np.allclose(written["blk.3.attn_q.weight"][1], base["model.layers.3.self_attn.q_proj.weight"])

    lora = tensors(GGUFReader(convert(smollm2_dir, tmp_path / "lora.gguf", outtype="f32", adapters=[adapter],
                                      lora_only=True)))
    state = {k: v.numpy() for k, v in load_file(adapter / "adapter_model.safetensors").items()}
    assert len(lora) == len(state) == 30 * 7 * 2  # lora_a and lora_b of 7 projections a layer
    gguf_of = {hf_name(n.removesuffix(".lora_a"), "llama"): n.removesuffix(".lora_a") for n in lora if n.endswith("_a")}
    for key, b in state.items():
        if "lora_B" in key:
            name = gguf_of[key.removeprefix("base_model.model.").replace(".lora_B.weight", ".weight")]
            np.testing.assert_array_equal(_undo(name, lora[name + ".lora_b"][1]), b, err_msg=name)  # alpha / r = 2
            np.testing.assert_array_equal(lora[name + ".lora_a"][1], state[key.replace("lora_B", "lora_A")])

    hf = load_tokenizer(str(smollm2_dir))
    from_gguf = AutoTokenizer.from_pretrained(tmp_path, gguf_file="merged.gguf")
    assert from_gguf(MIXED, add_special_tokens=False)["input_ids"] == hf(MIXED, add_special_tokens=False)["input_ids"]


def test_dpo_from_the_sft_adapter_learns_the_preferences(smollm2_gguf, smollm2_sft, tmp_path):
    """DPO starts with the policy equal to its reference (the SFT adapter): every implicit reward is 0, so held-out
    implicit-reward accuracy is 0 and the loss log 2. After 12 steps (96 pairs) both move on held-out pairs (measured:
    0.81 accuracy, loss 0.41 after 20 steps), and the SFT model's own ranking of the pairs does not fall."""
    dpo = load_recipe("dpo")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join((RECIPES / "data" / "demo_preference.jsonl").read_text().splitlines(True)[:400]))
    with _ProcessState():
        result = dpo.main(dpo.DPOConfig(
            model_name_or_path=str(smollm2_gguf), init_adapter=str(smollm2_sft[0] / "adapter"),
            dataset_name_or_path=str(data), output_dir=str(tmp_path / "dpo"), max_steps=12, learning_rate=2e-4,
            lora_r=16, lora_alpha=32.0, beta=0.1, per_device_train_batch_size=8, max_seq_length=128,
            answer_eval_dataset=None, logging_steps=1))
    print({k: v for k, v in result.items() if "accura" in k or k == "eval_loss"})
    assert result["eval_rewards/accuracies"] >= 0.7, result
    assert result["eval_loss"] <= 0.8 * math.log(2), result
    assert result["preference_accuracy"] >= result["preference_accuracy_before"], result


def test_grpo_from_a_weak_start_raises_the_reward(smollm2_gguf, smollm2_sft, tmp_path):
    """From the SFT run's step-5 checkpoint (50% held-out exact match), 16 GRPO steps of 4 prompts x 8 completions on
    the exact-match reward: the reward of the greedy answers to the 100 held-out prompts rises (measured: 50% -> 61%;
    the sampled rewards of single steps swing by 0.3 with their 4 prompts, too much to compare a few steps). lr 5e-4:
    3e-4 gave +6 points, 1e-3 collapsed the policy to 0% (as on tiny, REFERENCE.md section 7)."""
    grpo = load_recipe("grpo")
    start = smollm2_sft[0] / "checkpoint-5" / "adapter"
    with _ProcessState():
        result = grpo.main(grpo.GRPOConfig(
            model_name_or_path=str(smollm2_gguf), init_adapter=str(start), output_dir=str(tmp_path / "grpo"),
            max_steps=16, learning_rate=5e-4, lora_r=16, lora_alpha=32.0, per_device_train_batch_size=32,
            num_generations=8, max_completion_length=16, max_seq_length=128, max_new_tokens=32, logging_steps=1))
    print(f"GRPO held-out exact match {result['answer_accuracy_before']:.2f} -> {result['answer_accuracy']:.2f}")
    assert 0.3 <= result["answer_accuracy_before"] <= 0.7, result
    assert result["answer_accuracy"] >= result["answer_accuracy_before"] + 0.05, result
    assert len(logged(tmp_path / "grpo", "reward")) == 16


@pytest.fixture(scope="module")
def smollm2_reward(smollm2_gguf, tmp_path_factory):
    """A reward model on SmolLM2 (the real-model defaults: LoRA r16 / alpha 32, lr 1e-4, 8 pairs a step), 80 steps
    on the demo pairs, scored on the held-out pairs of recipes/data/demo_eval_pairs.jsonl; ``(output_dir, result)``."""
    rm = load_recipe("reward_model")
    out = tmp_path_factory.mktemp("smollm2-rm")
    with _ProcessState():
        result = rm.main(rm.RewardConfig(
            model_name_or_path=str(smollm2_gguf), output_dir=str(out), eval_dataset=str(EVAL_PAIRS),
            validation_split=0.0, max_steps=80, learning_rate=1e-4, lora_r=16, lora_alpha=32.0, warmup_ratio=0.03,
            per_device_train_batch_size=8, max_seq_length=128, logging_steps=10))
    return out, result


def test_a_reward_model_on_smollm2_ranks_held_out_pairs(smollm2_reward):
    """>= 90% of the held-out pairs ranked right (measured: 46% before, 92% after 50 steps, 98-99% after 75-100);
    the tiny model plateaus at 70-76%. Its merged directory, GRPO's and PPO's reward source, ranks them as training
    measured: the training text is the scoring text."""
    out, result = smollm2_reward
    assert result["pair_accuracy_before"] <= 0.6 and result["pair_accuracy"] >= 0.9, result
    pairs = [json.loads(line) for line in EVAL_PAIRS.read_text().splitlines()]
    _, reward = load_reward(str(out / "merged"))
    chosen = reward([p["prompt"] for p in pairs], [p["chosen"] for p in pairs])
    rejected = reward([p["prompt"] for p in pairs], [p["rejected"] for p in pairs])
    assert sum(c > r for c, r in zip(chosen, rejected)) / len(pairs) == pytest.approx(result["pair_accuracy"],
                                                                                       abs=1.5 / len(pairs))


def test_the_smollm2_reward_model_scores_a_tiny_policy(smollm2_reward, weak_sft, tmp_path):
    """The reward reads text: a GRPO run of the tiny policy (its own 1k-token vocabulary) takes the SmolLM2 reward
    model (49k tokens) as its reward; the logged rewards are its scores (not exact match's 0 / 1), varied."""
    grpo = load_recipe("grpo")
    with _ProcessState():
        grpo.main(grpo.GRPOConfig(init_adapter=str(weak_sft[0]), output_dir=str(tmp_path), max_steps=2,
                                  reward=[str(smollm2_reward[0] / "merged")], per_device_train_batch_size=16,
                                  num_generations=4, answer_eval_dataset=None, logging_steps=1))
    scores = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rewards = [m["reward"] for m in scores if "reward" in m]
    assert len(rewards) == 2 and all(math.isfinite(r) and r not in (0.0, 1.0) for r in rewards), rewards
    assert any(m.get("reward_std", 0) > 0.05 for m in scores), scores


CAPITAL = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.mark.parametrize("source", ["directory", "gguf"])
def test_server_answers_paris(smollm2_gguf, smollm2_dir, source):
    import openai

    model = str(smollm2_dir if source == "directory" else smollm2_gguf)
    proc, url = start_server(model)
    try:
        client = openai.OpenAI(base_url=url, api_key="none", timeout=120, max_retries=0)
        name = client.models.list().data[0].id
        reply = client.chat.completions.create(model=name, messages=CAPITAL, max_tokens=12, temperature=0)
        assert "Paris" in reply.choices[0].message.content, reply
    finally:
        proc.kill()
        proc.wait(timeout=30)
