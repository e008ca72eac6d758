"""Measure models side by side on one dataset: loss, perplexity and token accuracy under the training masks,
and greedy exact match / "contains" against reference answers.

The loss is the SFT recipe's eval loss: the same encoding (chat template, label masks, truncation) and the
same summed cross-entropy over trained tokens, so ``perplexity == exp(eval_loss)`` of a run on the same data.
"""

from __future__ import annotations

import logging
import math

import torch
from tqdm import tqdm

from minift.data.encode import encode_sft
from minift.data.formats import Chat, Prompt, Text, normalize
from minift.data.packing import collate_padded
from minift.data.read import Record
from minift.infer.engine import Generator
from minift.train.forward import CausalLMLoss
from minift.train.sampling import SamplingParams

logger = logging.getLogger(__name__)


def split_records(records: list[Record]) -> tuple[list, list[Prompt], list[str]]:
    """``(scored, prompts, skipped)``: conversations and texts to score under the training masks (a prompt with a
    reference ``answer`` counts as a conversation ending in that answer), the prompts that have a reference
    answer to compare greedy completions with, and why the other records (preference pairs, unpaired
    feedback, prompts without an answer) were left out. A malformed record raises ``RecordError``."""
    scored, prompts, skipped = [], [], []
    for record in records:
        example = normalize(record)  # a malformed record fails with its file:line, as in training
        if isinstance(example, Prompt) and "answer" in example.extra:
            scored.append(Chat([*example.messages, {"role": "assistant", "content": str(example.extra["answer"])}],
                               example.source))
            prompts.append(example)
        elif isinstance(example, (Chat, Text)):
            scored.append(example)
            if isinstance(example, Chat) and example.messages[-1]["role"] == "assistant" and len(example.messages) > 1:
                prompts.append(Prompt(example.messages[:-1], {"answer": example.messages[-1]["content"]},
                                      example.source))
        else:
            skipped.append(f"{record.source}: a {type(example).__name__.lower()} record has no single reference answer")
    return scored, prompts, skipped


def loss_metrics(gen: Generator, adapter: str, examples: list[dict], *, batch_size: int) -> dict[str, float]:
    """``loss`` (mean cross-entropy per trained token), ``perplexity`` = exp(loss), ``token_accuracy`` (argmax
    equals the target) and the trained ``tokens`` counted, with ``adapter`` active."""
    device = next(gen.model.parameters()).device
    sums = torch.zeros(3, dtype=torch.float64)
    loss_model = CausalLMLoss(gen.model).eval()
    with gen.active(adapter):
        for start in range(0, len(examples), batch_size):
            batch = collate_padded(examples[start: start + batch_size], gen.tokenizer.pad_token_id)
            sums += loss_model.eval_sums({k: v.to(device) for k, v in batch.items()})
    loss = (sums[0] / sums[2]).item()
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "token_accuracy": (sums[1] / sums[2]).item(),
            "tokens": int(sums[2])}


def reference_metrics(gen: Generator, adapter: str, prompts: list, *, max_new_tokens: int, batch_size: int) -> dict:
    """Greedy ``exact_match`` (stripped texts equal) and ``contains`` (the answer appears in the completion) over
    prompts with a reference ``answer``."""
    exact = contains = 0
    params = SamplingParams(max_new_tokens=max_new_tokens)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start: start + batch_size]
        for p, c in zip(chunk, gen.generate([p.messages for p in chunk], params, adapter=adapter)):
            answer = str(p.extra["answer"]).strip()
            exact += c.text.strip() == answer
            contains += answer in c.text
    return {"exact_match": exact / len(prompts), "contains": contains / len(prompts), "answered": len(prompts)}


def evaluate_models(gen: Generator, names: list[str], records: list[Record], *, max_seq_length: int = 128,
                    train_on: str = "completion", truncation: str = "truncate", max_new_tokens: int = 64,
                    batch_size: int = 16, generate: bool = True) -> dict[str, dict]:
    """Metrics of each model in ``names`` (``base`` or adapter names) on ``records``: ``{name: {metric: value}}``.
    Raises when the records have neither targets to score nor reference answers."""
    scored, prompts, skipped = split_records(records)
    if not scored:
        first = f" (first: {skipped[0]})" if skipped else ""
        raise ValueError(f"none of the {len(records)} records has an answer, completion or assistant turn to score"
                         + first)
    if skipped:
        logger.warning("%d of %d records left out; first: %s", len(skipped), len(records), skipped[0])
    examples = encode_sft(scored, gen.tokenizer, max_seq_length=max_seq_length, train_on=train_on,
                          truncation=truncation)[0]
    if not examples:
        raise ValueError(f"every scored record was dropped by truncation={truncation!r} at max_seq_length="
                         f"{max_seq_length}; raise --max_seq_length or use --truncation truncate")
    results = {}
    for name in tqdm(names, desc="evaluating", unit="model", disable=len(names) < 2):
        results[name] = loss_metrics(gen, name, examples, batch_size=batch_size)
        if generate and prompts:
            results[name].update(reference_metrics(gen, name, prompts, max_new_tokens=max_new_tokens,
                                                batch_size=batch_size))
    return results


SHARES = ("token_accuracy", "exact_match", "contains")


def results_table(results: dict[str, dict]) -> str:
    """A Markdown table: one row per metric, one column per model."""
    names = list(results)
    metrics = [m for m in ("loss", "perplexity", "token_accuracy", "tokens", "exact_match", "contains", "answered")
               if any(m in r for r in results.values())]

    def cell(metric: str, value) -> str:
        if value is None:
            return "-"
        if isinstance(value, int):
            return str(value)
        return f"{value:.2%}" if metric in SHARES else f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"

    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for m in metrics:
        lines.append(f"| {m} | " + " | ".join(cell(m, results[n].get(m)) for n in names) + " |")
    return "\n".join(lines)

