"""Forward wrappers DDP can see: summed cross-entropy (SFT) and per-sequence log-probs (preference, RL), with
only labelled positions reaching the LM head, in chunks; and the SFT evaluation."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from minift.constants import IGNORE_INDEX
from minift.lora.layers import ModulesToSave
from minift.losses import chunked_cross_entropy, chunked_distill_loss
from minift.losses.lm_head import segment_sums, token_logprobs
from minift.model.attention import flat_forward


@contextlib.contextmanager
def evaluation_mode(module: nn.Module):
    """``module`` in eval mode (no dropout) for the block, then back in the mode it was in."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def trained_tokens(batch: dict) -> torch.Tensor:
    """Tokens that are prediction targets (labels shifted by one, as the model uses them)."""
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()


def total_tokens(accelerator, counts) -> torch.Tensor:
    """A step's per-micro-batch token counts summed over its window and every process: the normalizer that gives
    any split of the step's data (micro-batches, processes) the same loss and gradient."""
    return accelerator.reduce(sum(counts).to(accelerator.device), "sum")


class CausalLMLoss(nn.Module):
    """Wraps a causal LM so that one forward (the one DDP watches) returns the summed cross-entropy
    over trained tokens and their count. Only positions with a label reach the LM head, in chunks,
    so ``[batch, seq, vocab]`` logits never exist."""

    def __init__(self, model: nn.Module, chunk_size: int = 4096):
        super().__init__()
        self.model, self.chunk_size = model, chunk_size

    def labelled_hidden(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The final hidden states ``(N, H)`` at the N positions whose next token is a target, and those targets
        ``(N,)`` (row-major order)."""
        documents = {}
        if "cu_seq_lens_q" in batch:  # a flat packed batch (collate_flat): attention within each document
            bounds = batch["cu_seq_lens_q"]
            longest = int((bounds[1:] - bounds[:-1]).max())
            documents = {"cu_seq_lens_q": bounds, "cu_seq_lens_k": batch["cu_seq_lens_k"], "max_length_q": longest,
                         "max_length_k": longest}
        with flat_forward() if documents else contextlib.nullcontext():
            out = self.model.base_model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                                        position_ids=batch.get("position_ids"), use_cache=False, **documents)
        targets = batch["labels"][:, 1:]
        mask = targets != IGNORE_INDEX
        return out.last_hidden_state[:, :-1][mask], targets[mask]

    def output_head(self) -> nn.Module:
        """The LM head that is active now (a ``modules_to_save`` copy when the adapter has one)."""
        head = self.model.get_output_embeddings()
        return head.current() if isinstance(head, ModulesToSave) else head

    def _logit_options(self) -> dict:
        cfg = self.model.config
        return {"softcap": getattr(cfg, "final_logit_softcapping", None), "scale": getattr(cfg, "logit_scale", None)}

    def forward(self, **batch) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, targets = self.labelled_hidden(batch)
        head = self.output_head()
        if type(head) is nn.Linear:
            loss = chunked_cross_entropy(hidden, head.weight, targets, chunk_size=self.chunk_size, bias=head.bias,
                                         **self._logit_options())
        else:  # a LoRA-wrapped or quantized head: recompute each chunk's logits in backward instead
            loss = hidden.new_zeros((), dtype=torch.float32)
            for h, t in zip(hidden.split(self.chunk_size), targets.split(self.chunk_size)):
                loss = loss + checkpoint(self._chunk_loss, head, h, t, use_reentrant=False)
        return loss, targets.numel()

    def _chunk_loss(self, head: nn.Module, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self._logits(head, h), t, reduction="sum")

    def _logits(self, head: nn.Module, h: torch.Tensor) -> torch.Tensor:
        logits = head(h).float()
        opts = self._logit_options()
        if opts["scale"]:
            logits = logits * opts["scale"]
        if opts["softcap"]:
            logits = opts["softcap"] * torch.tanh(logits / opts["softcap"])
        return logits

    @torch.no_grad()
    def eval_sums(self, batch: dict) -> torch.Tensor:
        """``[summed cross-entropy, correct argmax predictions, trained tokens]`` for one batch."""
        hidden, targets = self.labelled_hidden(batch)
        head = self.model.get_output_embeddings()
        sums = torch.zeros(3, dtype=torch.float64)
        for h, t in zip(hidden.split(self.chunk_size), targets.split(self.chunk_size)):
            logits = self._logits(head, h)
            sums[0] += F.cross_entropy(logits, t, reduction="sum").item()
            sums[1] += (logits.argmax(-1) == t).sum().item()
        sums[2] = targets.numel()
        return sums


class SequenceLogprobs(CausalLMLoss):
    """Wraps a causal LM so that one forward returns, per sequence (padded rows) or per document (packed
    rows with ``doc_index`` from ``collate_packed``), the summed completion log-prob ``(D,)`` float32 and
    the completion token count ``(D,)``. As in :class:`CausalLMLoss`, only labelled positions reach the
    LM head, in chunks: ``(batch, seq, vocab)`` logits never exist."""

    def forward(self, **batch) -> tuple[torch.Tensor, torch.Tensor]:
        logps = self.labelled_logps(batch)
        labels = batch["labels"][:, 1:]
        if "doc_index" in batch:
            doc = batch["doc_index"][:, 1:][labels != IGNORE_INDEX]
            n_docs = batch["doc_example_index"].shape[0]
        else:
            rows = torch.arange(labels.shape[0], device=labels.device)
            doc, n_docs = rows[:, None].expand_as(labels)[labels != IGNORE_INDEX], labels.shape[0]
        return segment_sums(logps, doc, n_docs)

    def labelled_logps(self, batch: dict, hidden_targets: tuple[torch.Tensor, torch.Tensor] | None = None
                       ) -> torch.Tensor:
        """``(N,)`` float32 log-probs of the labelled positions, in row-major order (``hidden_targets``: what
        :meth:`labelled_hidden` returned for ``batch``, when the caller has it already)."""
        hidden, targets = hidden_targets or self.labelled_hidden(batch)
        head = self.output_head()
        if type(head) is nn.Linear:
            return token_logprobs(hidden, head.weight, targets, chunk_size=self.chunk_size, bias=head.bias,
                                  **self._logit_options())
        # a LoRA-wrapped or quantized head: recompute each chunk's logits in backward
        parts = [checkpoint(self._chunk_logps, head, h, t, use_reentrant=False)
                 for h, t in zip(hidden.split(self.chunk_size), targets.split(self.chunk_size))]
        return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)

    def _chunk_logps(self, head: nn.Module, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return -F.cross_entropy(self._logits(head, h), t, reduction="none")

    @torch.no_grad()
    def candidate_logps(self, batch: dict, token_ids: list[int]) -> torch.Tensor:
        """``(N, C)`` float32: at each of the N labelled positions, the log-prob of each of the C candidate next
        tokens (one forward scores every single-token reply to a prompt)."""
        hidden, _ = self.labelled_hidden(batch)
        ids = torch.tensor(token_ids, device=hidden.device)
        return torch.cat([self._logits(self.output_head(), h).log_softmax(-1)[:, ids]
                          for h in hidden.split(self.chunk_size)])


class TokenLogprobs(SequenceLogprobs):
    """Wraps a causal LM so that one forward over padded rows returns per-token log-probs ``(B, T - 1)`` float32:
    position t is the log-prob of token t + 1, 0 where ``labels`` is ignored (the policy losses' layout). Only
    labelled positions reach the LM head, in chunks."""

    def forward(self, **batch) -> torch.Tensor:
        logps = self.labelled_logps(batch)
        labelled = batch["labels"][:, 1:] != IGNORE_INDEX
        return logps.new_zeros(labelled.shape).masked_scatter(labelled, logps)


class DistillLoss(CausalLMLoss):
    """Wraps a student causal LM so that one forward returns the generalized JSD to a teacher, summed over the
    trained tokens, and their count. The batch carries the teacher: ``teacher_hidden`` ``(N, Ht)`` (its final
    hidden states at the same N positions; its head is ``teacher_head``, kept out of the module's parameters so
    that DDP / FSDP see the student only) or its top-k, ``teacher_ids`` / ``teacher_logps`` ``(N, k)``. Neither
    model's ``(N, V)`` logits exist whole (:func:`minift.losses.chunked_distill_loss`): ``chunk_size`` positions at a
    time (64: each float32 ``(chunk, V)`` tensor is 8 MiB at V = 32k, and the step is no slower than with 256)."""

    def __init__(self, model: nn.Module, teacher_head: nn.Linear | None, *, beta: float, temperature: float,
                 vocab_size: int, chunk_size: int = 64):
        super().__init__(model, chunk_size)
        # a tuple, not a submodule: the teacher's head stays out of what DDP / FSDP wrap
        self.teacher_head = None if teacher_head is None else (teacher_head.weight, teacher_head.bias)
        self.beta, self.temperature, self.vocab_size = beta, temperature, vocab_size

    def forward(self, teacher_hidden=None, teacher_ids=None, teacher_logps=None, beta: float | None = None,
                **batch) -> tuple[torch.Tensor, int]:
        hidden, targets = self.labelled_hidden(batch)
        head = self.output_head()
        teacher = ({"teacher_ids": teacher_ids, "teacher_logps": teacher_logps} if teacher_ids is not None else
                   {"teacher_hidden": teacher_hidden, "teacher_weight": self.teacher_head[0],
                    "teacher_bias": self.teacher_head[1]})
        loss = chunked_distill_loss(hidden, head.weight, bias=head.bias, **teacher,
                                    beta=self.beta if beta is None else beta, temperature=self.temperature,
                                    vocab_size=self.vocab_size, chunk_size=self.chunk_size)
        return loss, targets.numel()


def evaluate(accelerator, loss_model: CausalLMLoss, batches: list[dict]) -> dict[str, float]:
    """Loss, perplexity and token accuracy over this process's eval batches, summed over processes."""
    sums = torch.zeros(3, dtype=torch.float64)
    with accelerator.autocast(), evaluation_mode(loss_model):
        for batch in batches:
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            sums += loss_model.eval_sums(batch)
    sums = accelerator.reduce(sums.to(accelerator.device), "sum").cpu()
    loss = (sums[0] / sums[2]).item() if sums[2] else float("nan")
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_token_acc": (sums[1] / sums[2]).item()}
