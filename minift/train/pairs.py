"""Preference pairs in training: one forward for chosen and rejected, per-pair log-probs, reference log-probs.

A micro-batch of pairs becomes one batch of sequences: packed (every chosen and rejected answer a
document of its own in full rows, no cross-document attention) or padded (chosen rows, then rejected
rows). :class:`~minift.train.forward.SequenceLogprobs` sums each document's completion log-probs and
:func:`pair_logps` regroups them per pair. The reference model is the model the stage starts from:
the same weights with the trainable adapter disabled, or a table computed once before training.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from minift.constants import IGNORE_INDEX
from minift.data.packing import CHOSEN, collate_flat, collate_padded, pack_pairs
from minift.lora.layers import disable_adapters
from minift.losses import DPO_LOSS_TYPES, cpo_loss, dpo_loss, orpo_loss, simpo_loss
from minift.model.files import set_usual_modes
from minift.train.forward import evaluation_mode
from minift.train.generation import generate

logger = logging.getLogger(__name__)
REFERENCE_FREE = ("simpo", "cpo", "orpo")  # losses computed from the policy alone


def collate_pairs(pairs: list[dict], pad_token_id: int, *, packing: bool, max_seq_length: int,
                  pad_to_multiple_of: int | None = None) -> dict:
    """Pairs (``chosen_input_ids/labels``, ``rejected_input_ids/labels``, ``index``) -> one model batch.

    Besides the model inputs it carries ``doc_example_index (D,)`` and ``doc_role (D,)`` (0 chosen,
    1 rejected): which pair, and which side, each sequence / packed document is; and ``pair_index
    (P,)``, each pair's position in its dataset (to look up precomputed reference log-probs).
    """
    if packing:
        rows, _ = pack_pairs(pairs, max_seq_length)
        batch = collate_flat(rows)
    else:
        docs = [{"input_ids": p[f"{side}_input_ids"], "labels": p[f"{side}_labels"]}
                for side in ("chosen", "rejected") for p in pairs]
        batch = collate_padded(docs, pad_token_id, pad_to_multiple_of=pad_to_multiple_of)
        batch["doc_example_index"] = torch.arange(len(pairs)).repeat(2)
        batch["doc_role"] = torch.arange(2).repeat_interleave(len(pairs))
    batch["pair_index"] = torch.tensor([p["index"] for p in pairs], dtype=torch.long)
    return batch


def pair_logps(logps_model: nn.Module, batch: dict) -> tuple[torch.Tensor, ...]:
    """Summed completion log-probs and lengths per pair: ``chosen, rejected, chosen_len, rejected_len (P,)``."""
    sums, counts = logps_model(**batch)
    # Each pair has exactly one chosen and one rejected document: sort documents by (pair, role).
    order = (batch["doc_example_index"] * 2 + (batch["doc_role"] != CHOSEN)).argsort()
    sums, counts = sums[order].view(-1, 2), counts[order].view(-1, 2)
    return sums[:, 0], sums[:, 1], counts[:, 0], counts[:, 1]


@dataclass(frozen=True)
class PreferenceLoss:
    """A pair loss by name: a DPO loss type (``sigmoid``, ``ipo``, ``hinge``, ... see
    :data:`~minift.losses.DPO_LOSS_TYPES`) or a reference-free ``simpo`` / ``cpo`` / ``orpo``, with its
    ``beta``, ``label_smoothing`` and SimPO's ``simpo_gamma``; ``rpo_alpha`` adds the chosen answers'
    length-averaged NLL (RPO; CPO's alpha)."""

    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    rpo_alpha: float = 0.0
    simpo_gamma: float = 0.5

    def __post_init__(self) -> None:
        if self.loss_type not in DPO_LOSS_TYPES + REFERENCE_FREE:
            raise ValueError(f"loss_type must be one of {', '.join(DPO_LOSS_TYPES + REFERENCE_FREE)}; "
                             f"got {self.loss_type!r}")
        if self.beta <= 0 or not 0 <= self.label_smoothing < 0.5 or self.rpo_alpha < 0:
            raise ValueError("beta must be > 0, label_smoothing in [0, 0.5) and rpo_alpha >= 0")

    @property
    def reference_free(self) -> bool:
        return self.loss_type in REFERENCE_FREE

    def __call__(self, policy: tuple, reference: tuple | None) -> tuple[torch.Tensor, ...]:
        """Per-pair losses and detached chosen / rejected rewards. ``policy`` = :func:`pair_logps`'s four
        tensors; ``reference`` = (chosen, rejected) log-probs, or None for the reference-free losses."""
        chosen, rejected, n_chosen, n_rejected = policy
        beta, eps = self.beta, self.label_smoothing
        if self.loss_type == "simpo":
            losses, r_chosen, r_rejected = simpo_loss(chosen, rejected, n_chosen, n_rejected, beta=beta,
                                                      gamma=self.simpo_gamma, label_smoothing=eps)
        elif self.loss_type == "cpo":
            losses, r_chosen, r_rejected = cpo_loss(chosen, rejected, beta=beta, label_smoothing=eps)
        elif self.loss_type == "orpo":
            losses, r_chosen, r_rejected, _ = orpo_loss(chosen, rejected, n_chosen, n_rejected, beta=beta)
        else:
            losses, r_chosen, r_rejected = dpo_loss(chosen, rejected, *reference, beta=beta, loss_type=self.loss_type,
                                                    label_smoothing=eps, chosen_lengths=n_chosen,
                                                    rejected_lengths=n_rejected)
        if self.rpo_alpha:
            losses = losses + self.rpo_alpha * (-chosen / n_chosen)
        return losses, r_chosen, r_rejected


METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected", "logps/accuracies")


def metric_sums(losses, r_chosen, r_rejected, chosen, rejected) -> torch.Tensor:
    """Per-batch sums of :data:`METRICS` and the pair count (last), to be summed over batches and processes.

    ``rewards/accuracies``: implicit reward of chosen > rejected; ``logps/accuracies``: the model itself
    gives the chosen answer the higher log-prob (meaningful before any training too)."""
    values = [losses, r_chosen, r_rejected, r_chosen - r_rejected, (r_chosen > r_rejected).float(), chosen, rejected,
              (chosen > rejected).float()]
    return torch.stack([v.detach().float().sum() for v in values] + [torch.tensor(float(losses.numel()))])


def mean_metrics(sums: torch.Tensor, prefix: str = "") -> dict[str, float]:
    n = max(sums[-1].item(), 1.0)
    return {prefix + name: (sums[i] / n).item() for i, name in enumerate(METRICS)}


class Reference:
    """Reference log-probs ``(chosen, rejected)`` per pair of a batch.

    Either the policy itself with ``adapter`` disabled (no second copy of the model: the frozen base and
    any init adapter stay on), or lookups into tables computed once by :meth:`precompute`.
    """

    def __init__(self, logps_model: nn.Module, adapter: str | None):
        self.logps_model, self.adapter = logps_model, adapter
        self.tables: dict[str, torch.Tensor] | None = None

    @torch.no_grad()
    def __call__(self, batch: dict, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tables is not None:
            table = self.tables[split].to(batch["pair_index"].device)[batch["pair_index"]]
            return table[:, 0], table[:, 1]
        # no dropout in the reference; a full fine-tune (adapter None) only gets here to precompute, before any
        # training step
        off = disable_adapters(self.logps_model.model, [self.adapter]) if self.adapter else contextlib.nullcontext()
        with evaluation_mode(self.logps_model), off:
            chosen, rejected, _, _ = pair_logps(self.logps_model, batch)
        return chosen, rejected

    def precompute(self, accelerator, splits: dict[str, list[list[dict]]], collate, path: Path, key: str) -> None:
        """Fill the tables for every split (``{name: list of micro-batches of pairs}``), or load them from
        ``path`` when it was written for the same ``key`` (data, model, init adapter, precision)."""
        if path.is_file():
            with safe_open(str(path), "pt") as f:
                same = (f.metadata() or {}).get("key") == key
            if same:
                logger.info("reusing reference log-probs from %s", path)
                self.tables = load_file(str(path))
                return
            logger.info("%s was computed for other data or another model: recomputing", path)
        from accelerate.utils import gather_object

        tables = {}
        for split, batches in splits.items():
            mine = batches[accelerator.process_index::accelerator.num_processes]
            rows = []
            for pairs in tqdm(mine, desc=f"reference log-probs ({split})", disable=not accelerator.is_main_process):
                batch = {k: v.to(accelerator.device) for k, v in collate(pairs).items()}
                with accelerator.autocast():
                    chosen, rejected = self(batch, split)
                rows += zip(batch["pair_index"].tolist(), chosen.tolist(), rejected.tolist())
            table = torch.zeros(sum(len(b) for b in batches), 2, dtype=torch.float32)
            for index, chosen, rejected in gather_object(rows):
                table[index] = torch.tensor([chosen, rejected])
            tables[split] = table
        if accelerator.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            save_file(tables, str(tmp), metadata={"key": key})
            set_usual_modes(tmp)
            tmp.replace(path)
        accelerator.wait_for_everyone()
        self.tables = tables


def reference_key(pairs: dict[str, list[dict]], *, model: str, init_adapter: str | None, dtype: str,
                  mixed_precision: str, max_seq_length: int) -> str:
    """What reference log-probs depend on: the tokens of every pair, the start model (base and init adapter),
    the precision and the sequence length."""
    digest = hashlib.sha256()
    for split in sorted(pairs):
        for p in pairs[split]:
            digest.update(json.dumps([p[k] for k in sorted(p) if k != "index"]).encode())
    init = Path(init_adapter) / "adapter_model.safetensors" if init_adapter else None
    if init is not None and init.is_file():
        digest.update(hashlib.sha256(init.read_bytes()).digest())
    return json.dumps({"data": digest.hexdigest(), "model": model, "dtype": dtype,
                       "mixed_precision": mixed_precision, "max_seq_length": max_seq_length})


def greedy_matches(model: nn.Module, tokenizer, pairs: list[dict], *, max_new_tokens: int,
                   desc: str | None = None) -> tuple[float, float]:
    """Shares of pairs whose greedy answer to the prompt equals the chosen / the rejected answer (stripped).
    ``desc``: a progress bar's label."""
    prompts, answers = [], []
    for p in pairs:
        ids, labels = p["chosen_input_ids"], p["chosen_labels"]
        start = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        prompts.append(ids[:start])
        answers.append([tokenizer.decode([t for t, label in zip(p[f"{side}_input_ids"], p[f"{side}_labels"])
                                          if label != IGNORE_INDEX], skip_special_tokens=True).strip()
                        for side in ("chosen", "rejected")])
    texts = tokenizer.batch_decode(generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, desc=desc),
                                   skip_special_tokens=True)
    return (sum(t.strip() == a[0] for t, a in zip(texts, answers)) / len(pairs),
            sum(t.strip() == a[1] for t, a in zip(texts, answers)) / len(pairs))
