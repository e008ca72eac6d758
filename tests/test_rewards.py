"""minift.train.rewards: the bundled rewards by hand, weights and None, loading by name / module:function /
reward-model directory, and every bad-input case failing with the reward's name and the prompt index."""

from __future__ import annotations

import math

import pytest
import torch

from minift.data.read import RecordError, load_records
from minift.train.rewards import (
    RewardError,
    Rewards,
    exact_match,
    length_penalty,
    load_reward,
    partial_credit,
    reward_text,
    think_format,
)


def test_bundled_rewards_by_hand():
    completions = ["cup red", " cup red\n", "red cup", "cup red red"]
    answers = ["cup red"] * 4
    assert exact_match(None, completions, answers) == [1.0, 1.0, 0.0, 0.0]
    # position by position over the longer list: 2/2, 2/2, 0/2, 2/3
    assert partial_credit(None, completions, answers) == [1.0, 1.0, 0.0, pytest.approx(2 / 3)]
    assert think_format(None, ["<think>a b</think> b a", "<think>x</think>", "b a", "<think>\n1\n</think>\nok"]) == \
        [1.0, 0.0, 0.0, 1.0]
    # L = 8: a cache of 2 tokens; 6 tokens no penalty, 7 halfway, 8 and beyond -1
    ids = [[0] * n for n in (3, 6, 7, 8, 10)]
    assert length_penalty(None, [""] * 5, ids, max_completion_length=8) == [0.0, 0.0, -0.5, -1.0, -1.0]


def test_weights_combine_and_none_is_left_out():
    def sometimes(prompts, completions, **_):
        return [1.0 if c == "a" else None for c in completions]

    def half(prompts, completions):
        return [0.5 for _ in completions]

    rewards = Rewards([("sometimes", sometimes), ("half", half)], weights=[2.0, 1.0])
    total, values = rewards(["p", "p"], ["a", "b"], [[1], [2]], {"answer": ["x", "y"]}, group_size=2)
    assert total.tolist() == [2.5, 0.5] and values["sometimes"] == [1.0, None]
    metrics = Rewards.metrics(total, values)
    assert metrics["rewards/sometimes/mean"] == 1.0 and metrics["rewards/half/mean"] == 0.5
    assert metrics["reward"] == pytest.approx(1.5) and metrics["reward_std"] == pytest.approx(math.sqrt(2))


def test_user_functions_load_by_file_and_get_the_fields_they_name(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def named(prompts, completions, answer):\n    return [float(a in c) for c, a in zip(completions, answer)]\n"
        "def everything(prompts, completions, **fields):\n    return [float(len(fields)) for _ in completions]\n")
    name, fn = load_reward(f"{tmp_path / 'my_rewards.py'}:named")
    assert name == "named"
    total, _ = Rewards([(name, fn)])(["p"] * 2, ["x cup", "y"], [[1], [2]], {"answer": ["cup", "cup"], "id": [1, 2]}, 2)
    assert total.tolist() == [1.0, 0.0]
    monkeypatch.syspath_prepend(str(tmp_path))
    name, fn = load_reward("my_rewards:everything")
    _, values = Rewards([(name, fn)])(["p"], ["x"], [[1]], {"answer": ["a"], "id": [1]}, 1)
    assert values["everything"] == [3.0]  # completion_ids, answer, id


def test_a_bad_reward_fails_with_its_name_and_the_prompt():
    def divides(prompts, completions, **_):
        return [1 / (len(c) - 1) for c in completions]

    cases = [(divides, "reward divides raised ZeroDivisionError: division by zero at prompt 1 (completion 0)"),
             (lambda prompts, completions: [0.0, math.nan, 0.0, 0.0], "returned nan at prompt 0 (completion 1)"),
             (lambda prompts, completions: [0.0], "returned 1 values for 4 completions"),
             (lambda prompts, completions: [0.0, 0.0, "1", 0.0], "returned str '1' at prompt 1 (completion 0)"),
             (lambda prompts, completions: [True] * 4, "returned bool True at prompt 0 (completion 0)"),
             (lambda prompts, completions: {"a": 1}, "returned dict; it must return a list")]
    for fn, message in cases:
        name = getattr(fn, "__name__", "f")
        with pytest.raises(RewardError, match=message.replace("(", r"\(").replace(")", r"\)")):
            Rewards([(name, fn)])(["p"] * 4, ["ab", "abc", "a", "abcd"], [[1]] * 4, {}, group_size=2)


def test_a_record_without_the_field_a_reward_needs_is_named(tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "c"}\n')
    rewards = Rewards([load_reward("exact_match"), load_reward("think_format")])
    with pytest.raises(RecordError, match=r"prompts.jsonl:2: the reward exact_match needs the field 'answer'"):
        rewards.check_records(load_records(data))
    Rewards([load_reward("think_format")]).check_records(load_records(data))  # it needs no field


def test_bad_reward_specs_say_what_to_pass(tmp_path):
    (tmp_path / "r.py").write_text("def wrong(texts):\n    return []\ndef fine(prompts, completions):\n    return []\n")
    cases = [("nope", "use a bundled name"), ("no_such_module_xyz:f", "cannot import no_such_module_xyz"),
             (f"{tmp_path / 'r.py'}:missing", "has no function 'missing'; it has: fine, wrong"),
             (f"{tmp_path / 'r.py'}:wrong", "must accept prompts and completions"),
             (str(tmp_path), "must hold a sequence-classification model"),
             ("length_penalty", "needs max_completion_length")]
    for spec, message in cases:
        with pytest.raises(ValueError, match=message):
            load_reward(spec)


def test_a_reward_model_directory_scores_the_last_token(tiny_dir, tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    name, rm = load_reward(str(tmp_path / "rm"))
    prompts, completions = ["Reverse: a b", "Reverse: a b c d"], ["b a", "d c b a and more words"]
    scores = rm(prompts, completions)
    model = LlamaForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    for p, c, score in zip(prompts, completions, scores):  # one text alone: no padding; the score at its last token
        ids = tokenizer(reward_text(tokenizer, p, c), return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            hidden = model.model(input_ids=ids).last_hidden_state
        assert score == pytest.approx(model.score(hidden[0, -1]).item(), abs=1e-5)
    assert scores[0] != scores[1] and name == "rm"
