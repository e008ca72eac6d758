"""AI feedback: a judge model compares two answers or rates one, read from its probabilities, not its prose.

Both judges ask with a rubric and read the verdict's distribution over the allowed replies:

- **pairwise** (``compare``): "A" or "B"; asked in both orders, ``P(first is better)`` is the mean of
  ``P(A | a, b)`` and ``P(B | b, a)``, which cancels a judge's preference for a position;
- **rating** (``rate``): "1" .. "10"; the score is the expected value of the rating under that distribution.

:class:`LocalJudge` is any causal LM: each reply's probability is that of its whole token sequence after the
rendered question, renormalized over the replies (so "10" is not confused with "1"); when every reply is one
token, one forward per question reads them all. :class:`APIJudge` is an
OpenAI-compatible endpoint (:class:`~minift.infer.client.ChatClient`, cached): it reads ``top_logprobs`` of
the first reply token when the server returns them, else parses the reply text.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod

import torch

from minift.constants import IGNORE_INDEX
from minift.data.packing import collate_padded
from minift.train.forward import TokenLogprobs, evaluation_mode

RUBRIC = "Judge correctness first, then helpfulness and brevity."
PAIRWISE = ("{rubric}\n\nQuestion:\n{prompt}\n\nAnswer A:\n{first}\n\nAnswer B:\n{second}\n\n"
            "Which answer is better? Reply with one letter: A or B.")
RATING = ("{rubric}\n\nQuestion:\n{prompt}\n\nAnswer:\n{answer}\n\n"
          "Rate the answer from 1 to 10. Reply with the number only.")
PAIR_REPLIES = ("A", "B")
RATING_REPLIES = tuple(str(k) for k in range(1, 11))


def _text(prompt) -> str:
    """A prompt given as messages, as the judge reads it: the last user turn's text."""
    if isinstance(prompt, str):
        return prompt
    return next(m["content"] for m in reversed(prompt) if m["role"] == "user")


class _Judge(ABC):
    """``compare`` and ``rate`` on top of ``distribution(questions, replies) -> (N, len(replies))``."""

    def __init__(self, rubric: str = RUBRIC):
        self.rubric = rubric

    @abstractmethod
    def distribution(self, questions: list[str], replies: tuple[str, ...]) -> torch.Tensor:
        """Each question's probabilities of the allowed replies (rows sum to 1)."""

    def compare(self, prompts: list, first: list[str], second: list[str]) -> list[float]:
        """``P(first answer is better)`` per prompt, averaged over both orders."""
        def ask(a, b):
            return [PAIRWISE.format(rubric=self.rubric, prompt=_text(p), first=x, second=y)
                    for p, x, y in zip(prompts, a, b)]

        forward = self.distribution(ask(first, second), PAIR_REPLIES)[:, 0]  # "A" = first
        backward = self.distribution(ask(second, first), PAIR_REPLIES)[:, 1]  # "B" = first
        return ((forward + backward) / 2).tolist()

    def rate(self, prompts: list, answers: list[str]) -> list[float]:
        """The expected rating (1..10) of each answer."""
        questions = [RATING.format(rubric=self.rubric, prompt=_text(p), answer=a) for p, a in zip(prompts, answers)]
        probs = self.distribution(questions, RATING_REPLIES)
        return (probs @ torch.arange(1, 11, dtype=probs.dtype)).tolist()


class LocalJudge(_Judge):
    """A causal LM (with its tokenizer's chat template) as the judge; ``batch_size`` questions x replies rows
    per forward."""

    def __init__(self, model, tokenizer, rubric: str = RUBRIC, batch_size: int = 32):
        super().__init__(rubric)
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.logps = TokenLogprobs(model)

    def _prompt_ids(self, question: str) -> list[int]:
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                  add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def distribution(self, questions: list[str], replies: tuple[str, ...]) -> torch.Tensor:
        reply_ids = [self.tokenizer(r, add_special_tokens=False)["input_ids"] for r in replies]
        single = all(len(r) == 1 for r in reply_ids)  # one row per question scores every reply at once
        rows = [{"input_ids": q + r, "labels": [IGNORE_INDEX] * len(q) + r}
                for q in map(self._prompt_ids, questions) for r in (reply_ids[:1] if single else reply_ids)]
        scores, device = [], next(self.model.parameters()).device
        with evaluation_mode(self.model):
            for at in range(0, len(rows), self.batch_size):
                batch = collate_padded(rows[at: at + self.batch_size], self.tokenizer.pad_token_id)
                batch = {k: v.to(device) for k, v in batch.items()}
                logps = (self.logps.candidate_logps(batch, [r[0] for r in reply_ids]) if single else
                         self.logps(**batch).sum(-1))
                scores.append(logps.double().cpu())
        return torch.cat(scores).view(len(questions), len(replies)).softmax(-1)


class APIJudge(_Judge):
    """An OpenAI-compatible chat endpoint as the judge (greedy, one short reply per question)."""

    def __init__(self, client, rubric: str = RUBRIC, top_logprobs: int = 20):
        super().__init__(rubric)
        self.client, self.top_logprobs = client, top_logprobs

    def distribution(self, questions: list[str], replies: tuple[str, ...]) -> torch.Tensor:
        options = {"temperature": 0, "max_tokens": 3, "logprobs": True, "top_logprobs": self.top_logprobs}
        answers = self.client.chat_many([([{"role": "user", "content": q}], options) for q in questions])
        return torch.stack([_reply_distribution(a, replies) for a in answers])


def _reply_distribution(answer: dict, replies: tuple[str, ...]) -> torch.Tensor:
    """The distribution over ``replies`` in one chat-completions answer: from the first token's top log-probs
    (only replies whose text is one token can be read there), else one-hot on the reply the text starts with."""
    choice = answer["choices"][0]
    content = ((choice.get("logprobs") or {}).get("content")) or []
    if content and content[0].get("top_logprobs"):
        mass = {r: 0.0 for r in replies}
        for alt in content[0]["top_logprobs"]:
            token = alt["token"].strip()
            if token in mass:
                mass[token] += math.exp(alt["logprob"])
        if sum(mass.values()) > 0:
            probs = torch.tensor([mass[r] for r in replies], dtype=torch.float64)
            return probs / probs.sum()
    text = (choice.get("message") or {}).get("content") or ""
    found = re.match(r"\s*(\w+)", text)
    word = found.group(1) if found else ""
    if word not in replies:
        raise ValueError(f"the judge replied {text[:80]!r}, which is none of {', '.join(replies)}; adjust the rubric "
                         f"or use a judge that follows the reply format")
    return torch.tensor([float(r == word) for r in replies], dtype=torch.float64)


def pair_accuracy(judge: _Judge, pairs: list[dict]) -> tuple[float, list[float]]:
    """How often ``judge`` prefers ``chosen`` to ``rejected`` in ``{"prompt", "chosen", "rejected"}`` records
    (asked in both orders; a pair counts when ``P(chosen is better) > 0.5``), and that probability per pair."""
    p_chosen = judge.compare([p["prompt"] for p in pairs], [p["chosen"] for p in pairs],
                             [p["rejected"] for p in pairs])
    return sum(p > 0.5 for p in p_chosen) / len(pairs), p_chosen


class JudgeReward:
    """A judge as an online-RL reward (:class:`~minift.train.rewards.Rewards`) for groups of ``group_size``
    completions of each prompt, laid out prompt-major as rollouts make them: each completion's score is its mean
    probability of beating the other completions of its prompt (every pair compared in both orders), in [0, 1]."""

    def __init__(self, judge: _Judge, group_size: int):
        if group_size < 2:
            raise ValueError("a pairwise judge needs at least 2 completions per prompt to compare")
        self.judge, self.group_size, self.__name__ = judge, group_size, "judge"

    def __call__(self, prompts: list, completions: list[str], **_) -> list[float]:
        G = self.group_size
        if len(completions) % G:
            raise ValueError(f"{len(completions)} completions do not form groups of {G}")
        pairs = [(g + i, g + j) for g in range(0, len(completions), G) for i in range(G) for j in range(i + 1, G)]
        first_better = self.judge.compare([prompts[a] for a, _ in pairs], [completions[a] for a, _ in pairs],
                                          [completions[b] for _, b in pairs])
        wins = [0.0] * len(completions)
        for (a, b), p in zip(pairs, first_better):
            wins[a] += p
            wins[b] += 1 - p
        return [w / (G - 1) for w in wins]
