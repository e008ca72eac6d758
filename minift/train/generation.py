"""Greedy generation (through :mod:`minift.train.sampling`) and exact match against reference answers."""

from __future__ import annotations

import re

from torch import nn
from tqdm.auto import tqdm

from minift.data.encode import encode_prompts
from minift.data.formats import normalize_all
from minift.data.read import load_records
from minift.lora.merge import folded_adapters
from minift.train.sampling import SamplingParams, sample_chunks


def generate(model: nn.Module, tokenizer, prompts: list[list[int]], *, max_new_tokens: int,
             batch_size: int = 64, desc: str | None = None) -> list[list[int]]:
    """Greedy completion token ids for each prompt (already rendered with the chat template), in batches of
    ``batch_size``, without the EOS token that ended them. ``desc``: a progress bar with that label, counting
    prompts (on a real model an evaluation's generation takes minutes)."""
    params = SamplingParams(max_new_tokens=max_new_tokens)
    outputs = []
    with folded_adapters(model), tqdm(total=len(prompts), desc=desc, unit="prompt", disable=desc is None) as bar:
        for i, c in sample_chunks(model, tokenizer, prompts, params, chunk=batch_size):
            outputs.append(c.token_ids[:-1] if c.finish_reason == "stop" else c.token_ids)
            if (i + 1) % batch_size == 0 or i + 1 == len(prompts):  # a batch is done: its prompts count at once
                bar.update(i + 1 - bar.n)
    return outputs


def final_answer(text: str, pattern: str) -> str | None:
    """The last match of ``pattern`` in ``text`` (its group, if it has one), stripped; None when there is none."""
    found = list(re.finditer(pattern, text, re.M))
    if not found:
        return None
    return (found[-1].group(1) if found[-1].re.groups else found[-1].group(0)).strip()


def answer_accuracy(model: nn.Module, tokenizer, examples: list[dict], *, max_new_tokens: int = 32,
                    batch_size: int = 64, answer_pattern: str | None = None, desc: str | None = None) -> float:
    """Share of ``examples`` (``{"input_ids", "answer"}``) whose greedy completion equals the answer (both
    stripped); with ``answer_pattern``, the completion's :func:`final_answer` is compared instead. ``desc``: a
    progress bar's label (see :func:`generate`)."""
    if not examples:
        raise ValueError("answer_accuracy needs at least one example")
    outputs = generate(model, tokenizer, [e["input_ids"] for e in examples], max_new_tokens=max_new_tokens,
                       batch_size=batch_size, desc=desc)
    texts = tokenizer.batch_decode(outputs, skip_special_tokens=True)
    got = [final_answer(t, answer_pattern) if answer_pattern else t.strip() for t in texts]
    return sum(g == e["answer"].strip() for g, e in zip(got, examples)) / len(examples)


def answer_eval_examples(path: str | None, tokenizer, *, max_prompt_length: int) -> list[dict]:
    """Prompts with reference answers (any prompt record format with an ``answer``) for :func:`answer_accuracy`,
    rendered with the chat template; none when ``path`` is None."""
    if not path:
        return []
    prompts = normalize_all(load_records(path), "prompt")
    return encode_prompts(prompts.examples, tokenizer, max_prompt_length=max_prompt_length)[0]


def answer_metrics(model: nn.Module, tokenizer, examples: list[dict], *, max_new_tokens: int,
                   answer_pattern: str | None = None, suffix: str = "") -> dict:
    """``{"answer_accuracy" + suffix: greedy exact match}`` on ``examples``, with a progress bar of that name;
    empty when there are none."""
    if not examples:
        return {}
    name = "answer_accuracy" + suffix
    return {name: answer_accuracy(model, tokenizer, examples, max_new_tokens=max_new_tokens,
                                  answer_pattern=answer_pattern, desc=name)}
