"""Sequence log-probs of a model (DPO and RL), batched generation, and answer accuracy against references."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from minift.lora import ModulesToSave
from minift.losses.lm_head import segment_sums, token_logprobs
from minift.train import IGNORE_INDEX, CausalLMLoss


class SequenceLogprobs(CausalLMLoss):
    """Wraps a causal LM so that one forward returns, per sequence (padded rows) or per document (packed
    rows with ``doc_index`` from ``collate_packed``), the summed completion log-prob ``(D,)`` float32 and
    the completion token count ``(D,)``. As in :class:`CausalLMLoss`, only labelled positions reach the
    LM head, in chunks: ``(batch, seq, vocab)`` logits never exist."""

    def forward(self, **batch) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, targets = self._hidden_and_targets(batch)
        labels = batch["labels"][:, 1:]
        if "doc_index" in batch:
            doc = batch["doc_index"][:, 1:][labels != IGNORE_INDEX]
            n_docs = batch["doc_example_index"].shape[0]
        else:
            rows = torch.arange(labels.shape[0], device=labels.device)
            doc, n_docs = rows[:, None].expand_as(labels)[labels != IGNORE_INDEX], labels.shape[0]
        head = self.model.get_output_embeddings()
        if isinstance(head, ModulesToSave):
            head = head.current()
        if type(head) is nn.Linear:
            logps = token_logprobs(hidden, head.weight, targets, chunk_size=self.chunk_size, bias=head.bias,
                                   **self._logit_options())
        else:  # a LoRA-wrapped or quantized head: recompute each chunk's logits in backward
            parts = [checkpoint(self._chunk_logps, head, h, t, use_reentrant=False)
                     for h, t in zip(hidden.split(self.chunk_size), targets.split(self.chunk_size))]
            logps = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
        return segment_sums(logps, doc, n_docs)

    def _chunk_logps(self, head: nn.Module, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return -F.cross_entropy(self._logits(head, h), t, reduction="none")


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, batch_size: int = 64,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0) -> list[list[int]]:
    """Completion token ids for each prompt (left-padded in batches), cut before the first EOS.

    ``prompts``: token id lists (already rendered with the chat template). Greedy by default.
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
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {
                "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                                 pad_token_id=pad, eos_token_id=eos, **sampling)
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
    from minift.data import load_records
    from minift.encode import encode_prompts
    from minift.formats import normalize_all

    if not path:
        return []
    prompts = normalize_all(load_records(path), "prompt")
    return encode_prompts(prompts.examples, tokenizer, max_prompt_length=max_prompt_length)[0]


def answer_metrics(model: nn.Module, tokenizer, examples: list[dict], *, max_new_tokens: int, suffix: str = "") -> dict:
    """``{"answer_accuracy" + suffix: greedy exact match}`` on ``examples``; empty when there are none."""
    if not examples:
        return {}
    return {"answer_accuracy" + suffix: answer_accuracy(model, tokenizer, examples, max_new_tokens=max_new_tokens)}
