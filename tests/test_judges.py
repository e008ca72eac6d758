"""minift.train.judges: a local LM judge read from its reply probabilities (both orders for pairs, the expected
rating for scores), and an API judge reading top log-probs or, without them, the reply text."""

from __future__ import annotations

import math

import pytest
import torch

from minift.constants import IGNORE_INDEX
from minift.data.packing import collate_padded
from minift.model.load import load_model_and_tokenizer
from minift.train.forward import TokenLogprobs
from minift.train.judges import PAIRWISE, RATING, RUBRIC, APIJudge, LocalJudge

PROMPTS = ["Reverse the words: red cup", [{"role": "user", "content": "Reverse the words: big dog"}]]
GOOD, BAD = ["cup red", "dog big"], ["red cup", "big dog"]


def reply_logps(model, tok, question: str, replies: list[str]) -> torch.Tensor:
    """log P(reply | question) by hand: the chat-rendered question, each reply's tokens summed."""
    q = tok(tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                    add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    rows = []
    for reply in replies:
        r = tok(reply, add_special_tokens=False)["input_ids"]
        rows.append({"input_ids": q + r, "labels": [IGNORE_INDEX] * len(q) + r})
    with torch.no_grad():
        return TokenLogprobs(model)(**collate_padded(rows, tok.pad_token_id)).sum(-1).double()


def test_local_judge_compares_in_both_orders_and_rates_by_expectation(tiny_dir):
    model, tok = load_model_and_tokenizer(str(tiny_dir))
    judge = LocalJudge(model, tok, batch_size=3)
    p_good = judge.compare(PROMPTS, GOOD, BAD)
    p_bad = judge.compare(PROMPTS, BAD, GOOD)
    assert all(a + b == pytest.approx(1.0, abs=1e-9) for a, b in zip(p_good, p_bad))  # order-symmetric
    forward = reply_logps(model, tok, PAIRWISE.format(rubric=RUBRIC, prompt="Reverse the words: red cup",
                                                      first=GOOD[0], second=BAD[0]), ["A", "B"]).softmax(-1)
    backward = reply_logps(model, tok, PAIRWISE.format(rubric=RUBRIC, prompt="Reverse the words: red cup",
                                                       first=BAD[0], second=GOOD[0]), ["A", "B"]).softmax(-1)
    assert p_good[0] == pytest.approx(float(forward[0] + backward[1]) / 2, abs=1e-5)
    ratings = judge.rate(PROMPTS, GOOD)
    probs = reply_logps(model, tok, RATING.format(rubric=RUBRIC, prompt="Reverse the words: big dog", answer=GOOD[1]),
                        [str(k) for k in range(1, 11)]).softmax(-1)
    assert ratings[1] == pytest.approx(float(probs @ torch.arange(1, 11, dtype=torch.float64)), abs=1e-5)
    assert all(1 <= r <= 10 for r in ratings)


class Replies:
    """A stand-in client: each question's canned answer, chosen by what the question contains."""

    def __init__(self, answer_for):
        self.answer_for, self.asked = answer_for, []

    def chat_many(self, requests):
        self.asked += [messages[0]["content"] for messages, _ in requests]
        return [self.answer_for(messages[0]["content"]) for messages, _ in requests]


def with_top(pairs: dict[str, float], text: str = "") -> dict:
    top = [{"token": t, "logprob": math.log(p)} for t, p in pairs.items()]
    return {"choices": [{"message": {"content": text}, "logprobs": {"content": [{"token": text, "top_logprobs": top}]}}]}


def text_only(text: str) -> dict:
    return {"choices": [{"message": {"content": text}}]}


def test_api_judge_reads_top_logprobs_or_the_text():
    def first_is_good(question: str) -> bool:
        return f"Answer A:\n{GOOD[0]}\n" in question

    # the good answer shown as A: P(A) = .8 (and " B" .2); shown as B: P(B) = .7 -> P(good better) = (.8 + .7) / 2
    judge = APIJudge(Replies(lambda q: with_top({"A": 0.8, " B": 0.2}) if first_is_good(q) else
                             with_top({"A": 0.3, "B": 0.7, "C": 0.01})))
    assert judge.compare(PROMPTS[:1], GOOD[:1], BAD[:1]) == [pytest.approx(0.75)]
    # no log-probs: the reply text; the judge says the good answer's letter in both orders -> 1
    judge = APIJudge(Replies(lambda q: text_only("A. It reverses") if first_is_good(q) else text_only("B")))
    assert judge.compare(PROMPTS[:1], GOOD[:1], BAD[:1]) == [1.0]
    rater = APIJudge(Replies(lambda q: with_top({"7": 0.5, "8": 0.25, "x": 0.25})))
    assert rater.rate(PROMPTS, GOOD) == [pytest.approx(7 * 2 / 3 + 8 / 3)] * 2
    assert APIJudge(Replies(lambda q: text_only("10"))).rate(PROMPTS[:1], GOOD[:1]) == [10.0]
    with pytest.raises(ValueError, match="replied 'maybe both', which is none of A, B"):
        APIJudge(Replies(lambda q: text_only("maybe both"))).compare(PROMPTS[:1], GOOD[:1], BAD[:1])

