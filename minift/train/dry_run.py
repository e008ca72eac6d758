"""``--dry_run``: what a stage would do, checked without loading a weights file. Its data is opened and every record
format-checked (the first bad one named with its file and line), counted per split and format, and turned into
the number of steps; model, teacher, judge and reward-model paths are checked; a logit-distillation teacher's
vocabulary is compared with the student's from config and tokenizer files. Any recipe takes ``--dry_run``;
``recipes/pipeline.py --dry_run`` runs the same checks for every stage of a pipeline."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

# Options that name a model or adapters, which a pipeline's earlier stage may write.
MODEL_OPTIONS = ("teacher_model_name_or_path", "judge_model_name_or_path")
ADAPTER_OPTIONS = ("teacher_adapter", "judge_adapter")


@dataclass
class DataPlan:
    examples: dict[str, int] = field(default_factory=dict)  # split -> records
    formats: dict[str, dict] = field(default_factory=dict)  # split -> {format: count}
    steps: int | None = None
    notes: list[str] = field(default_factory=list)
    example: str | None = None  # the first training example as encoded, its trained tokens marked


def check_models(cfg, where: str, *, student: str, later: Callable[[str], bool] = lambda _: False) -> list[str]:
    """Teacher / judge / reward-model paths exist (those for which ``later(path)`` is true are written before the
    stage runs, and are checked then); a logit teacher shares ``student``'s vocabulary. Returns notes."""
    from minift.model.load import resolve_model_path
    from minift.model.vocab import shared_vocabulary

    for name in MODEL_OPTIONS:
        value = getattr(cfg, name, None)
        if value and not later(value):
            try:
                resolve_model_path(value)
            except (OSError, ValueError) as err:
                raise FileNotFoundError(f"{where}: {name}: {err}") from err
    for name in ADAPTER_OPTIONS:
        for value in getattr(cfg, name, None) or []:
            if not later(value) and not (Path(value) / "adapter_config.json").is_file():
                raise FileNotFoundError(f"{where}: {name}: {value} is not an adapter directory (no adapter_config.json)")
    for value in getattr(cfg, "reward", None) or []:
        if value.startswith((".", "/", "~")) and ":" not in value and not later(value) and not Path(value).is_dir():
            raise FileNotFoundError(f"{where}: reward {value} does not exist")
    teacher = getattr(cfg, "teacher_model_name_or_path", None)
    if teacher and hasattr(cfg, "teacher_top_k"):  # logit distillation: one vocabulary for both
        if later(teacher):
            return [f"the teacher {teacher} is written by an earlier stage: its vocabulary is checked then"]
        shared_vocabulary(student, teacher)
    return []


def plan_data(cfg, tokenizer, world: int = 1) -> DataPlan:
    """Open ``cfg``'s data, check every record against the recipe's kind (``RECORDS``), count examples per split
    and format, and the optimizer steps (packed rows for packed SFT data; ``cfg.batch_plan()`` per step)."""
    from minift.data.encode import encode_sft, show_trained
    from minift.data.formats import normalize_all
    from minift.data.packing import pack_examples
    from minift.data.read import load_records, train_eval_records
    from minift.train.batches import check_enough_rows, total_steps

    plan = DataPlan()
    kind = getattr(type(cfg), "RECORDS", None)
    if not getattr(cfg, "dataset_name_or_path", None) or kind is None:
        return plan
    if kind == "prompt":  # online recipes and teachers use every prompt; held-out ones come from answer_eval_dataset
        splits = {"train": load_records(cfg.dataset_name_or_path)}
    else:
        splits = train_eval_records(cfg.dataset_name_or_path, cfg.eval_dataset, cfg.validation_split, cfg.seed)
    rows = 0
    for split, records in splits.items():
        if not records:
            continue
        norm = normalize_all(records, kind, fmt=cfg.dataset_format, skip_invalid=cfg.skip_invalid)
        plan.examples[split], plan.formats[split] = len(norm.examples), dict(norm.formats)
        if norm.skipped:
            plan.notes.append(f"{split}: {len(norm.skipped)} invalid records skipped (first: {norm.skipped[0]})")
        if split == "train":
            rows = len(norm.examples)
            if kind == "sft" and norm.examples and hasattr(cfg, "train_on"):
                first, _ = encode_sft(norm.examples[:1], tokenizer, max_seq_length=cfg.max_seq_length,
                                      train_on=cfg.train_on, truncation="truncate")
                if first:
                    plan.example = show_trained(tokenizer, first[0]["input_ids"], first[0]["labels"])
            if kind == "sft" and getattr(cfg, "packing", False) and hasattr(cfg, "train_on"):
                encoded, _ = encode_sft(norm.examples, tokenizer, max_seq_length=cfg.max_seq_length,
                                        train_on=cfg.train_on, truncation=cfg.truncation)
                rows = len(pack_examples(encoded, cfg.max_seq_length)[0])
    if getattr(cfg, "answer_eval_dataset", None):
        normalize_all(load_records(cfg.answer_eval_dataset), "prompt")
    if hasattr(cfg, "batch_plan") and getattr(type(cfg), "STEPS_KNOWN", True):
        per_device, repeats = cfg.batch_plan()
        check_enough_rows(rows, cfg, world, "rows" if kind == "sft" else "examples", per_device)
        plan.steps = total_steps(cfg, rows // (per_device * world) * repeats)
    elif getattr(cfg, "max_steps", 0):
        plan.steps = cfg.max_steps
    else:
        plan.notes.append("steps: set by what the stage makes first (e.g. the rationales a teacher gets right)")
    return plan


def describe(plan: DataPlan) -> list[str]:
    lines = [f"    {split} records: " + ", ".join(f"{k} {n}" for k, n in sorted(formats.items()))
             for split, formats in plan.formats.items()]
    lines += [f"    note: {n}" for n in plan.notes]
    if plan.example is not None:
        lines.append("    first training example, trained tokens between [[ ]]:")
        lines += [f"      {line}" if line else "" for line in plan.example.splitlines()]
    return lines


def recipe_dry_run(cfg, name: str) -> str:
    """A single recipe's ``--dry_run``: the checks above for ``cfg``; returns what to print."""
    from minift.data.encode import set_chat_template
    from minift.model.load import load_tokenizer

    model = getattr(cfg, "model_name_or_path", "tiny")
    notes = check_models(cfg, f"{name}", student=model)
    tokenizer = load_tokenizer(model)
    set_chat_template(tokenizer, getattr(cfg, "chat_template", None))
    plan = plan_data(cfg, tokenizer, int(os.environ.get("WORLD_SIZE", "1")))
    plan.notes += notes
    start = model + (f" + {cfg.init_adapter}" if getattr(cfg, "init_adapter", None) else "")
    lines = [f"{name} (dry run, no weights loaded): starts from {start}; writes {cfg.output_dir}",
             "    examples: " + (", ".join(f"{k} {v}" for k, v in plan.examples.items()) or "none")
             + (f"; steps: {plan.steps}" if plan.steps is not None else "")]
    if getattr(cfg, "real_model_note", None) and cfg.real_model_note():
        lines.append(f"    {cfg.real_model_note()}")
    return "\n".join(lines + describe(plan))
