"""The pipeline's plan: every stage's config built and checked, its data opened and format-checked, model,
teacher and reward-model paths checked, teacher vocabularies compared from config files, the examples and
steps of each stage counted. Nothing here reads a weights file: ``--dry_run`` prints this plan and stops, and a
real run makes it first, so a mistake in stage 5 fails before stage 1 trains."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from minift.config import ConfigError, field_default
from minift.pipeline.chain import Chain
from minift.pipeline.spec import PipelineSpec, StageSpec, check_references, stage_config
from minift.train.dry_run import DataPlan, check_models, describe, plan_data


@dataclass
class StagePlan:
    stage: StageSpec
    config: object
    model: str  # the model the stage loads: the base, a merged chain, or an earlier full fine-tune
    init_adapter: str | None  # the chain's adapters so far, combined (None: none)
    chain: list[str] = field(default_factory=list)  # the adapters behind init_adapter
    data: DataPlan = field(default_factory=DataPlan)

    @property
    def steps(self) -> int | None:
        return self.data.steps

    @property
    def examples(self) -> dict[str, int]:
        return self.data.examples


def chain_starts(spec: PipelineSpec) -> list[tuple[str, str | None, list[str]]]:
    """``(model, init adapter, the adapters it combines)`` each stage starts from, as the paths that the earlier
    stages and :class:`~minift.pipeline.chain.Chain` will write."""
    chain, out = Chain(spec.model_name_or_path), []
    for stage in spec.stages:
        out.append((*chain.start(stage, Path(spec.output_dir), write=False), list(chain.adapters)))
        rank = getattr_default(stage, "lora_r", None)  # a stage without LoRA options (an evaluation) trains nothing
        made = None if rank is None else "model" if rank == 0 else "adapter"
        chain.add(stage, made, Path(spec.output_dir) / stage.dir_name)
    return out


def getattr_default(stage: StageSpec, name: str, default):
    """An option's value for ``stage``: given in its stage_configs, else its config class's default."""
    if name in stage.options:
        return stage.options[name]
    fields = {f.name: f for f in dataclasses.fields(stage.config_class)}
    return field_default(fields[name]) if name in fields else default


def _future(path: str, spec: PipelineSpec, stage: StageSpec) -> bool:
    """Whether ``path`` lies in the directory of an earlier stage (or in the stage's own ``start/``), so that it
    exists only once the pipeline got there."""
    root = Path(spec.output_dir).resolve()
    try:
        rel = Path(path).resolve().relative_to(root)
    except ValueError:
        return False
    earlier = {s.dir_name for s in spec.stages if s.index <= stage.index}  # its own start/ is written first
    return bool(rel.parts) and rel.parts[0] in earlier


def make_plan(spec: PipelineSpec) -> list[StagePlan]:
    """Every stage checked as far as it can be before anything trains (see the module doc). Raises ConfigError,
    FileNotFoundError or RecordError naming the file, the line and the stage."""
    from minift.data.encode import set_chat_template
    from minift.data.read import RecordError
    from minift.model.load import load_tokenizer

    check_references(spec)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tokenizers: dict[tuple, object] = {}
    plans = []
    for stage, (model, init_adapter, adapters) in zip(spec.stages, chain_starts(spec)):
        fixed = {"output_dir": str(Path(spec.output_dir) / stage.dir_name), "model_name_or_path": model,
                 "init_adapter": None}  # the chain's adapter exists only once the earlier stages ran
        cfg = stage_config(spec, stage, fixed)
        plan = StagePlan(stage, cfg, model, init_adapter, adapters if init_adapter else [])
        # A merged or fully fine-tuned start does not exist yet: its tokenizer is the base model's.
        tokenizer_path = model if not _future(model, spec, stage) else spec.model_name_or_path
        try:
            notes = check_models(cfg, f"{spec.path}: stage {stage.name}", student=tokenizer_path,
                                 later=lambda path: _future(path, spec, stage))
            if getattr(cfg, "dataset_name_or_path", None):
                key = (tokenizer_path, getattr(cfg, "chat_template", None))
                if key not in tokenizers:
                    tokenizers[key] = load_tokenizer(tokenizer_path)
                    set_chat_template(tokenizers[key], key[1])
                plan.data = plan_data(cfg, tokenizers[key], world)
            plan.data.notes += notes
        except (ConfigError, RecordError) as err:
            raise type(err)(f"{err} [stage {stage.name}, {stage.recipe}]") from err
        except ValueError as err:
            raise ConfigError(f"{spec.path}: stage {stage.name} ({stage.recipe}): {err}") from err
        plans.append(plan)
    return plans


def plan_text(spec: PipelineSpec, plans: list[StagePlan]) -> str:
    """The plan as a table, then each stage's settings that differ from its recipe's defaults."""
    lines = [f"pipeline {spec.path}: {len(plans)} stages, base {spec.model_name_or_path}, output {spec.output_dir}", ""]
    head = f"{'#':>2}  {'stage':<14} {'recipe':<14} {'starts from':<34} {'train':>7} {'eval':>6} {'steps':>6}"
    lines += [head, "-" * len(head)]
    root = Path(spec.output_dir)
    for p in plans:
        model = str(Path(p.model).relative_to(root)) if Path(p.model).is_relative_to(root) else Path(p.model).name
        start = " + ".join([model] + [Path(a).parent.name.split("_", 1)[1] for a in p.chain])
        if p.stage.start_from == "base":
            start = f"{model} (side model)"
        steps = "" if p.steps is None else str(p.steps)
        lines.append(f"{p.stage.index:>2}  {p.stage.name:<14} {p.stage.recipe:<14} {start[:34]:<34} "
                     f"{p.examples.get('train', ''):>7} {p.examples.get('eval', ''):>6} {steps:>6}")
    if spec.export:
        parts = [k for k in ("adapter", "merge") if getattr(spec.export, k)]
        if spec.export.gguf_outtype:
            parts.append(f"gguf {spec.export.gguf_outtype}" + (" + Ollama Modelfile" if spec.export.ollama else ""))
        if spec.export.hub_repo_id:
            parts.append(f"hub {spec.export.hub_repo_id}")
        lines.append(f"    export         {', '.join(parts) or 'nothing'} -> {Path(spec.output_dir) / 'export'}")
    lines.append("")
    for p in plans:
        changed = {f.name: getattr(p.config, f.name) for f in dataclasses.fields(p.config)
                   if getattr(p.config, f.name) != field_default(f) and f.name != "init_adapter"}
        if p.init_adapter:
            changed["init_adapter"] = p.init_adapter
        lines.append(f"{p.stage.dir_name}: " + ", ".join(f"{k}={v}" for k, v in changed.items()))
        lines += describe(p.data)
    return "\n".join(lines)
