"""``output_dir/pipeline.json``: each stage's config hash, status, outputs and result, so that a re-run skips what
is done, redoes what changed (and everything after it) and resumes what was interrupted; and the summary table."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from minift.config import run_settings

RECORD = "pipeline.json"
# A stage's headline metric, the first of these its result has (exact match is shown on its own).
KEY_METRICS = ("eval_rewards/accuracies", "eval_accuracy", "eval_ranking", "eval_true_win_rate", "eval_win_rate",
               "eval_kl", "reward")


@dataclass
class Previous:
    """What a custom stage's ``main(config, previous)`` receives: the earlier stages' results and directories."""

    results: dict[str, dict] = field(default_factory=dict)  # stage name -> its result, in order
    output_dirs: dict[str, Path] = field(default_factory=dict)
    model_name_or_path: str = ""  # what this stage starts from (also set in its config, where it has the field)
    init_adapter: str | None = None

    @property
    def last(self) -> dict | None:
        """The result of the stage just before (None for the first)."""
        return list(self.results.values())[-1] if self.results else None


def config_hash(cfg, recipe: str, start_from: str, upstream: str) -> str:
    """The stage's settings (what a resume may not change; not the paths the pipeline sets) with its recipe, start
    and the hash of every stage before it: a change anywhere earlier changes it."""
    settings = {k: v for k, v in run_settings(cfg).items() if k not in ("model_name_or_path", "init_adapter")}
    text = json.dumps({"recipe": recipe, "start_from": start_from, "settings": settings, "upstream": upstream},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class PipelineRecord:
    def __init__(self, output_dir: str | Path, config_path: str | Path):
        self.path = Path(output_dir) / RECORD
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.data["config"] = str(config_path)
        self.data.setdefault("stages", {})

    def get(self, name: str) -> dict:
        return self.data["stages"].get(name, {})

    def set(self, name: str, **fields) -> None:
        """Update a stage's entry and write the file atomically (temp file, then rename)."""
        self.data["stages"].setdefault(name, {}).update(fields)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)


def _number(x, pct: bool = False) -> str:
    if not isinstance(x, (int, float)):
        return "-"
    return f"{100 * x:.0f}%" if pct else f"{x:.4g}"


def summary_table(rows: list[tuple[str, str, dict]]) -> str:
    """Markdown: per stage (name, status, result) its steps, time, final train and eval loss, exact match before ->
    after where it was measured, and one more metric of its kind."""
    lines = ["| stage | status | steps | time | train loss | eval loss | exact match | metric |",
             "|---|---|---:|---:|---:|---:|---|---|"]
    for name, status, result in rows:
        match = "-"
        for key in ("answer_accuracy", "final_answer_accuracy"):
            if key in result:
                match = f"{_number(result.get(key + '_before'), True)} -> {_number(result[key], True)}"
        metric = next((f"{k} {_number(result[k], k != 'eval_kl' and k != 'reward')}" for k in KEY_METRICS
                       if isinstance(result.get(k), (int, float))), "-")
        seconds = result.get("seconds")
        lines.append(f"| {name} | {status} | {result.get('step', '-')} | "
                     f"{'-' if seconds is None else f'{seconds:.0f} s'} | {_number(result.get('train_loss'))} | "
                     f"{_number(result.get('eval_loss'))} | {match} | {metric} |")
    return "\n".join(lines) + "\n"
