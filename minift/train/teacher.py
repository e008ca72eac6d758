"""A frozen teacher for distillation: loaded with its adapters folded in, run on the student's batches (its final
hidden states at the trained positions, for :func:`minift.losses.chunked_distill_loss`), or read from a file of
its top-k log-probs computed once.

The teacher is never part of the module the launcher wraps (DDP / FSDP see only the student); its outputs enter
the student's forward as inputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from minift.config import ConfigError
from minift.constants import IGNORE_INDEX
from minift.lora.adapters import load_adapter
from minift.lora.merge import merge_lora, unwrap_lora
from minift.model.attention import use_document_attention
from minift.model.files import set_usual_modes
from minift.model.load import load_model, resolve_model_path
from minift.train.forward import CausalLMLoss
from minift.train.jsonl_cache import JsonlCache, cache_key
from minift.train.sampling import SamplingParams, sample_chunks

logger = logging.getLogger(__name__)


def load_teacher(name_or_path: str, tokenizer, *, adapters: list[str] = (), dtype: str = "float32",
                 quantization: str | None = None) -> nn.Module:
    """The teacher model, frozen, in eval mode: a base (``quantization`` None, ``"4bit"`` or ``"8bit"``) with
    ``adapters`` applied in order (merged into full-precision weights; kept as frozen LoRA layers on a
    quantized base, where merging would round)."""
    model = load_model(name_or_path, tokenizer, dtype=dtype, quantization=quantization)
    use_document_attention(model)
    for i, adapter in enumerate(adapters):
        load_adapter(model, adapter, adapter_name=f"teacher_{i}", trainable=False)
    if adapters and quantization is None:
        merge_lora(model)
        unwrap_lora(model)
    return model.requires_grad_(False).eval()


def plain_head(model: nn.Module, who: str) -> nn.Linear:
    """The model's output head as a plain ``nn.Linear`` (what the chunked divergence multiplies by); a head that
    is adapted, quantized or scaled after the matmul (logit soft-capping, a logit scale) is refused."""
    head = CausalLMLoss(model).output_head()
    config = getattr(model, "config", None)
    if type(head) is not nn.Linear:
        raise ConfigError(f"the {who}'s output head is a {type(head).__name__}, not a plain Linear layer: logit "
                         f"distillation multiplies by the head itself; leave lm_head out of target_modules and "
                         f"modules_to_save, and do not quantize it")
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        raise ConfigError(f"the {who} soft-caps or scales its logits, which logit distillation does not model")
    return head


class Teacher:
    """``teacher(batch)`` -> what the student's distillation forward needs from the teacher for ``batch``: its
    final hidden states at the batch's trained positions (``{"teacher_hidden": (N, Ht)}``), or its cached top-k
    (``{"teacher_ids", "teacher_logps"}``, gathered by :class:`TopKCache`). ``head``: its LM head ``(weight,
    bias)`` for the dense case."""

    def __init__(self, model: nn.Module | None, autocast):
        self.model, self.autocast = model, autocast
        self.reader = CausalLMLoss(model) if model is not None else None
        self.head = plain_head(model, "teacher") if model is not None else None

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        if "teacher_ids" in batch:  # the top-k file already gave it
            return {}
        with self.autocast():
            hidden, _ = self.reader.labelled_hidden(batch)
        return {"teacher_hidden": hidden}


def teacher_identity(teacher: str, adapters: list[str], dtype: str) -> str:
    """What a teacher's outputs depend on: its directory (and config), its adapters' weights, its precision."""
    path = Path(resolve_model_path(teacher))
    source = (path / "config.json").read_text() if (path / "config.json").is_file() else teacher
    digest = hashlib.sha256(source.encode())
    for adapter in adapters:
        digest.update(hashlib.sha256((Path(adapter) / "adapter_model.safetensors").read_bytes()).digest())
    return f"{path}|{digest.hexdigest()}|{dtype}"


def teacher_key(rows: dict[str, list[dict]], *, teacher: str | None, adapters: list[str], dtype: str, k: int) -> str:
    """What a top-k file depends on: the teacher (:func:`teacher_identity`; None: not known, the file's own is
    taken), k, and every row's tokens and labels (so another packing or another max_seq_length is another file)."""
    digest = hashlib.sha256()
    for split in sorted(rows):
        for row in rows[split]:
            digest.update(json.dumps([row["input_ids"], row["labels"]]).encode())
    return json.dumps({"data": digest.hexdigest(), "k": k,
                       "teacher": teacher and teacher_identity(teacher, adapters, dtype)})


class TopKCache:
    """The teacher's top-k log-probs at every trained position of every row, in one safetensors file: per split,
    ``<split>.ids`` ``(T, k)`` int32, ``<split>.logps`` ``(T, k)`` float16 and ``<split>.offsets`` ``(rows + 1,)``
    (row i's positions are ``offsets[i]:offsets[i + 1]``, in the order the batches' labels list them). About
    ``6k`` bytes per position, against ``2V`` for dense fp16 logits (k = 20, V = 32k: 1/533).

    Rows carry their index in the split (``cache_index``); :meth:`attach` adds a batch's slices to it."""

    def __init__(self, tables: dict[str, torch.Tensor]):
        self.tables = tables

    @classmethod
    def load_or_compute(cls, path: Path, key: str, accelerator, teacher: Teacher, rows: dict[str, list[dict]],
                        collate, k: int, vocab_size: int, batch_size: int) -> TopKCache:
        """Read ``path`` when it was written for ``key``; else compute it with ``teacher`` (each process a share
        of the rows, gathered) and write it atomically. Without a teacher model a missing or stale file is an
        error."""
        wanted = json.loads(key)
        if path.is_file():
            with safe_open(str(path), "pt") as f:
                saved = json.loads((f.metadata() or {}).get("key") or "{}")
            if wanted["teacher"] is None:  # no teacher model given: the file's own teacher serves
                saved["teacher"] = None
            if saved == wanted:
                logger.info("reading the teacher's top-%d log-probs from %s", k, path)
                return cls(load_file(str(path)))
            differs = ", ".join(f"{name}" + (f" {saved.get(name)} -> {wanted[name]}" if name == "k" else "")
                                for name in wanted if saved.get(name) != wanted[name])
            if teacher.model is None:
                raise ConfigError(f"teacher_cache {path} was computed for other data, another teacher or another k "
                                  f"(here: {differs}); give --teacher_model_name_or_path to recompute it, or the "
                                  f"settings it was made with")
            logger.info("%s was computed for other settings (%s): recomputing", path, differs)
        elif teacher.model is None:
            raise FileNotFoundError(f"teacher_cache {path} does not exist; give --teacher_model_name_or_path to write "
                                    f"it first")
        from accelerate.utils import gather_object

        tables = {}
        for split, split_rows in rows.items():
            mine = list(range(len(split_rows)))[accelerator.process_index::accelerator.num_processes]
            parts = []
            for start in tqdm(range(0, len(mine), batch_size), desc=f"teacher top-{k} ({split})",
                              disable=not accelerator.is_main_process):
                chunk = mine[start: start + batch_size]
                batch = {name: v.to(accelerator.device) for name, v in collate([split_rows[i] for i in chunk]).items()}
                logits = teacher.head(teacher(batch)["teacher_hidden"])[:, :vocab_size].float()  # padded rows: no tokens
                logps, ids = logits.log_softmax(-1).topk(k, dim=-1)
                # a row's trained positions are contiguous in the batch's row-major order
                counts = [sum(label != IGNORE_INDEX for label in split_rows[i]["labels"][1:]) for i in chunk]
                for i, row_ids, row_logps in zip(chunk, ids.int().cpu().split(counts), logps.half().cpu().split(counts)):
                    parts.append((i, row_ids, row_logps))
            gathered = sorted(gather_object(parts), key=lambda p: p[0])
            lengths = torch.tensor([0] + [len(p[1]) for p in gathered])
            tables[f"{split}.offsets"] = lengths.cumsum(0)
            tables[f"{split}.ids"] = torch.cat([p[1] for p in gathered]) if gathered else torch.zeros(0, k, dtype=torch.int32)
            tables[f"{split}.logps"] = torch.cat([p[2] for p in gathered]) if gathered else torch.zeros(0, k, dtype=torch.float16)
        if accelerator.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            save_file(tables, str(tmp), metadata={"key": key})
            set_usual_modes(tmp)
            tmp.replace(path)
            logger.info("wrote the teacher's top-%d log-probs to %s (%.1f MiB)", k, path, path.stat().st_size / 2**20)
        accelerator.wait_for_everyone()
        return cls(tables)

    def attach(self, batch: dict, split: str, indices: list[int]) -> dict:
        """``batch`` (made of the split's rows ``indices``, in order) with ``teacher_ids`` / ``teacher_logps``."""
        offsets = self.tables[f"{split}.offsets"]
        spans = [slice(int(offsets[i]), int(offsets[i + 1])) for i in indices]
        batch["teacher_ids"] = torch.cat([self.tables[f"{split}.ids"][s] for s in spans]).long()
        batch["teacher_logps"] = torch.cat([self.tables[f"{split}.logps"][s] for s in spans]).float()
        return batch


def prompt_of(row: dict) -> list[int]:
    """The tokens before an encoded example's first trained token: its prompt."""
    start = next(i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX)
    if start == 0:
        raise ConfigError("an example has no prompt (a plain text record?): on_policy and sequence modes complete "
                          "prompts; use prompt / completion or conversation records")
    return row["input_ids"][:start]


def with_completion(prompt: list[int], completion: list[int]) -> dict:
    """An encoded example: ``prompt`` untrained, ``completion`` trained."""
    return {"input_ids": prompt + completion, "labels": [IGNORE_INDEX] * len(prompt) + completion}


def teacher_completions(teacher: nn.Module, tokenizer, rows: list[dict], path: Path, accelerator, identity: str,
                        max_new_tokens: int) -> list[dict]:
    """Sequence-level KD's data: each encoded example's prompt with the teacher's greedy completion, generated once
    (each process a share) into the JSONL cache at ``path``, keyed by the teacher's ``identity``, the length and
    the prompt, so a rerun generates nothing again."""
    cache = JsonlCache(path, accelerator.process_index)
    keys = [cache_key([identity, max_new_tokens], prompt_of(row)) for row in rows]
    params = SamplingParams(max_new_tokens=max_new_tokens)

    def produce(todo: list[int], add) -> None:
        for k, c in sample_chunks(teacher, tokenizer, [prompt_of(rows[i]) for i in todo], params):
            add(todo[k], c.token_ids)

    cache.fill(keys, accelerator, produce, "teacher completions")
    return [with_completion(prompt_of(row), cache[key]) for row, key in zip(rows, keys)]
