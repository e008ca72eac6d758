"""Batched greedy generation and exact match against reference answers."""

from __future__ import annotations

import torch
from torch import nn

from minift.data.encode import encode_prompts
from minift.data.formats import normalize_all
from minift.data.read import load_records

GREEDY = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}  # unset sampling defaults


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: list[list[int]], *, max_new_tokens: int,
             batch_size: int = 64) -> list[list[int]]:
    """Completion token ids for each prompt (left-padded in batches), cut before the first EOS.

    ``prompts``: token id lists (already rendered with the chat template).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    completions = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start: start + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, p in enumerate(chunk):
                ids[i, width - len(p):] = torch.tensor(p)
                mask[i, width - len(p):] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                                 pad_token_id=pad, eos_token_id=eos, **GREEDY)
            for row in out[:, width:].tolist():
                completions.append(row[: row.index(eos)] if eos in row else row)
    finally:
        model.train(was_training)
    return completions


def answer_accuracy(model: nn.Module, tokenizer, examples: list[dict], *, max_new_tokens: int = 32,
                    batch_size: int = 64) -> float:
    """Share of ``examples`` (``{"input_ids", "answer"}``) whose greedy completion equals the answer (stripped)."""
    if not examples:
        raise ValueError("answer_accuracy needs at least one example")
    outputs = generate(model, tokenizer, [e["input_ids"] for e in examples], max_new_tokens=max_new_tokens,
                       batch_size=batch_size)
    texts = tokenizer.batch_decode(outputs, skip_special_tokens=True)
    return sum(t.strip() == e["answer"].strip() for t, e in zip(texts, examples)) / len(examples)


def answer_eval_examples(path: str | None, tokenizer, *, max_prompt_length: int) -> list[dict]:
    """Prompts with reference answers (any prompt record format with an ``answer``) for :func:`answer_accuracy`,
    rendered with the chat template; none when ``path`` is None."""
    if not path:
        return []
    prompts = normalize_all(load_records(path), "prompt")
    return encode_prompts(prompts.examples, tokenizer, max_prompt_length=max_prompt_length)[0]


def answer_metrics(model: nn.Module, tokenizer, examples: list[dict], *, max_new_tokens: int, suffix: str = "") -> dict:
    """``{"answer_accuracy" + suffix: greedy exact match}`` on ``examples``; empty when there are none."""
    if not examples:
        return {}
    return {"answer_accuracy" + suffix: answer_accuracy(model, tokenizer, examples, max_new_tokens=max_new_tokens)}
