"""A custom pipeline stage: a quality gate that stops the pipeline when the chain so far answers worse than the
stage before it said it did. The README's guide shows this file; tests/test_pipeline.py runs it between stages.

    stages: [sft, {name: gate, recipe: pipeline_gate}, dpo]
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from minift.config import opt
from minift.lora.adapters import load_adapter
from minift.model.load import load_model, load_tokenizer
from minift.pipeline import Previous
from minift.train.generation import answer_accuracy, answer_eval_examples


@dataclass
class GateConfig:
    output_dir: str = opt("out/gate", "where the report goes (the pipeline sets it)")
    model_name_or_path: str = opt("tiny", "the chain's model (the pipeline sets it)")
    init_adapter: str | None = opt(None, "the chain's adapters (the pipeline sets it)")
    eval_file: str = opt("recipes/data/demo_eval.jsonl", "prompts with reference answers")
    max_drop: float = opt(0.02, "the most exact match may fall below the previous stage's figure")


def main(config: GateConfig, previous: Previous) -> dict:
    tokenizer = load_tokenizer(config.model_name_or_path)
    model = load_model(config.model_name_or_path, tokenizer).eval()
    if config.init_adapter:
        load_adapter(model, config.init_adapter)
    examples = answer_eval_examples(config.eval_file, tokenizer, max_prompt_length=128)
    accuracy = answer_accuracy(model, tokenizer, examples, max_new_tokens=16)
    claimed = (previous.last or {}).get("answer_accuracy")
    report = {"answer_accuracy": accuracy, "previous_stage": list(previous.results)[-1:], "claimed": claimed}
    Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(config.output_dir) / "gate.json").write_text(json.dumps(report, indent=2))
    if claimed is not None and accuracy < claimed - config.max_drop:
        raise ValueError(f"exact match {accuracy:.2f} is below the previous stage's {claimed:.2f}")
    return report
