"""A pipeline file: the base model, ``output_dir``, an ordered list of stages, each stage's options, an export.

    model_name_or_path: tiny
    output_dir: out/chain
    stages:
      - sft                                    # a recipe by file name: recipes/sft.py
      - dpo
      - {name: dpo_round2, recipe: dpo}        # a recipe twice, under another name
      - {name: rm, recipe: reward_model}       # a side model: its output stays out of the chain
      - ppo
      - {name: mine, recipe: my_package.my_stage}      # a user's module: a config dataclass, main(config, previous)
    stage_configs:
      dpo: {beta: 0.5}
      ppo: {reward: ["${rm}/merged"]}          # ${name}: that earlier stage's output directory
    export: {merge: true, gguf_outtype: q8_0, ollama: true}

Every key is checked against its class's fields with the file and line of the mistake and the closest key.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import inspect
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minift.config import ConfigError, config_from_dict, load_yaml, opt

START_FROM = ("adapter", "merged", "base")
SIDE_RECIPES = ("reward_model",)  # their output is not a policy: later stages name it, none starts from it
SET_BY_PIPELINE = ("output_dir", "model_name_or_path", "init_adapter", "overwrite_output_dir", "resume_from_checkpoint")
REFERENCE = re.compile(r"\$\{([A-Za-z0-9_.-]+)\}")


@dataclass
class ExportConfig:
    """What the export step writes to ``output_dir/export`` from the chain's final model."""

    adapter: bool = opt(True, "one adapter equal to the whole chain (rank: the chain's ranks summed)")
    merge: bool = opt(False, "the chain merged into the base: a plain model directory")
    gguf_outtype: str | None = opt(None, "also a GGUF file: f32, f16, bf16, q8_0 or q4_0 (none: no GGUF)")
    ollama: bool = opt(False, "an Ollama Modelfile next to the GGUF file")
    hub_repo_id: str | None = opt(None, "upload the merged model (else the adapter) to this hub repository")
    hub_private: bool = opt(True, "create the hub repository as private")

    def __post_init__(self) -> None:
        from minift.export.gguf.convert import OUTTYPES

        if self.gguf_outtype is not None and self.gguf_outtype not in OUTTYPES:
            raise ValueError(f"gguf_outtype must be one of {', '.join(OUTTYPES)}, got {self.gguf_outtype!r}")
        if self.ollama and not self.gguf_outtype:
            raise ValueError("ollama needs gguf_outtype: the Modelfile points at the GGUF file")


@dataclass
class StageSpec:
    """One entry of ``stages``: its name, recipe, where it starts from and its raw options (with their lines)."""

    index: int
    name: str
    recipe: str
    start_from: str
    options: dict[str, Any]
    lines: dict[str, int]
    line: int
    module: Any = None
    config_class: Any = None

    @property
    def dir_name(self) -> str:
        return f"{self.index:02d}_{self.name}"

    @property
    def in_chain(self) -> bool:
        """Whether later stages start from this stage's output (side models, such as judges, do not)."""
        return self.start_from != "base" and self.recipe not in SIDE_RECIPES

    @property
    def takes_previous(self) -> bool:
        return len(inspect.signature(self.module.main).parameters) >= 2


@dataclass
class PipelineSpec:
    path: Path
    model_name_or_path: str
    output_dir: str
    stages: list[StageSpec]
    export: ExportConfig | None
    names: dict[str, StageSpec] = field(default_factory=dict)


def load_recipe(recipe: str, recipes_dir: Path, where: str):
    """A built-in recipe by file name (``recipes/<recipe>.py``) or a user's ``package.module``; either exposes
    ``main(config[, previous])`` whose first parameter is annotated with its config dataclass."""
    builtin = sorted(p.stem for p in recipes_dir.glob("*.py") if p.stem not in ("pipeline", "__init__"))
    if str(recipes_dir) not in sys.path:  # recipes import each other by file name (``from sft import ...``)
        sys.path.insert(0, str(recipes_dir))
    if "" not in sys.path and str(Path.cwd()) not in sys.path:  # a user's module in the working directory
        sys.path.append(str(Path.cwd()))
    if "." not in recipe and recipe not in builtin and importlib.util.find_spec(recipe) is None:
        close = difflib.get_close_matches(recipe, builtin, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"{where}: no recipe {recipe!r}; {hint}built-in recipes: {', '.join(builtin)}; or name a "
                          f"module of yours (module or package.module, on the Python path)")
    try:
        module = importlib.import_module(recipe)
    except ImportError as err:
        raise ConfigError(f"{where}: cannot import {recipe!r} ({err}); a custom stage is a module on the Python "
                          f"path (run from its project's directory, or set PYTHONPATH)") from err
    main = getattr(module, "main", None)
    if not callable(main):
        raise ConfigError(f"{where}: {recipe} has no main(config, previous) function")
    params = list(inspect.signature(main).parameters)
    hints = typing.get_type_hints(main) if params else {}
    config_class = hints.get(params[0]) if params else None
    if not (dataclasses.is_dataclass(config_class) and "output_dir" in {f.name for f in dataclasses.fields(config_class)}):
        raise ConfigError(f"{where}: {recipe}.main's first parameter must be annotated with its config dataclass, "
                          f"which has an output_dir field (e.g. def main(config: MyConfig, previous) -> dict)")
    return module, config_class


def _stage_entry(entry, i: int, lines: dict[tuple, int], where: str) -> tuple[str, str, str]:
    loc = f"{where}:{lines.get(('stages', i), 0)}"
    if isinstance(entry, str):
        return entry, entry, "adapter"
    if not isinstance(entry, dict):
        raise ConfigError(f"{loc}: a stage is a recipe name or a mapping with name, recipe and start_from; got {entry!r}")
    unknown = sorted(set(entry) - {"name", "recipe", "start_from"})
    if unknown:
        close = difflib.get_close_matches(unknown[0], ["name", "recipe", "start_from"], n=1)
        line = lines.get(("stages", i, unknown[0]), 0)
        raise ConfigError(f"{where}:{line}: unknown stage key {unknown[0]!r}"
                          + (f"; did you mean {close[0]!r}?" if close else "; a stage has name, recipe, start_from"))
    recipe = entry.get("recipe") or entry.get("name")
    name = entry.get("name") or recipe
    start = entry.get("start_from", "adapter")
    if not isinstance(recipe, str) or not isinstance(name, str):
        raise ConfigError(f"{loc}: a stage needs a recipe (and may have a name), got {entry!r}")
    if start not in START_FROM:
        raise ConfigError(f"{loc}: start_from must be adapter, merged or base, got {start!r}")
    return name, recipe, start


def parse_pipeline(path: str | Path, recipes_dir: Path, *, model_name_or_path: str | None = None,
                   output_dir: str | None = None) -> PipelineSpec:
    """Read and check the file's structure and stage names; stage options are checked by :func:`stage_config`."""
    path = Path(path)
    data, lines = load_yaml(path)
    where = str(path)
    top = ("model_name_or_path", "output_dir", "stages", "stage_configs", "export")
    for key in data:
        if key not in top:
            close = difflib.get_close_matches(key, top, n=1)
            raise ConfigError(f"{where}:{lines.get((key,), 0)}: unknown key {key!r}"
                              + (f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(top)}"))
    stages_raw = data.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise ConfigError(f"{where}:{lines.get(('stages',), 0)}: stages must be a non-empty list of stages")
    stages: list[StageSpec] = []
    names: dict[str, StageSpec] = {}
    configs = data.get("stage_configs") or {}
    if not isinstance(configs, dict):
        raise ConfigError(f"{where}:{lines.get(('stage_configs',), 0)}: stage_configs must map stage names to options")
    for i, entry in enumerate(stages_raw):
        name, recipe, start = _stage_entry(entry, i, lines, where)
        line = lines.get(("stages", i), 0)
        if name in names:
            raise ConfigError(f"{where}:{line}: stage name {name!r} is used twice (first on line {names[name].line}); "
                              f"give the second a name of its own: {{name: {name}_2, recipe: {recipe}}}")
        if name == "export" or not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise ConfigError(f"{where}:{line}: stage name {name!r}: use letters, digits, _ and - (and not 'export')")
        options = configs.get(name) or {}
        if not isinstance(options, dict):
            raise ConfigError(f"{where}:{lines.get(('stage_configs', name), 0)}: stage_configs.{name} must be a "
                              f"mapping of {recipe}'s options")
        module, config_class = load_recipe(recipe, recipes_dir, f"{where}:{line}")
        option_lines = {k: lines.get(("stage_configs", name, k), 0) for k in options}
        stage = StageSpec(i + 1, name, recipe, start, dict(options), option_lines, line, module, config_class)
        stages.append(stage)
        names[name] = stage
    for name in configs:
        if name not in names:
            close = difflib.get_close_matches(name, list(names), n=1)
            raise ConfigError(f"{where}:{lines.get(('stage_configs', name), 0)}: stage_configs names {name!r}, "
                              f"which is not in stages" + (f"; did you mean {close[0]!r}?" if close else ""))
    export = None
    if data.get("export") is not None:
        if not isinstance(data["export"], dict):
            raise ConfigError(f"{where}:{lines.get(('export',), 0)}: export must be a mapping of export options")
        export = config_from_dict(ExportConfig, data["export"], where,
                                  {k: lines.get(("export", k), 0) for k in data["export"]})
    model = model_name_or_path or data.get("model_name_or_path") or "tiny"
    out = output_dir or data.get("output_dir")
    if not out:
        raise ConfigError(f"{where}: output_dir is required (in the file or as --output_dir)")
    return PipelineSpec(path, str(model), str(out), stages, export, names)


def references(stage: StageSpec) -> list[tuple[str, str]]:
    """``(option, referenced stage name)`` for every ``${name}`` in the stage's options."""
    found = []
    for key, value in stage.options.items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str):
                found += [(key, m) for m in REFERENCE.findall(item)]
    return found


def check_references(spec: PipelineSpec) -> None:
    """Each ``${name}`` names a stage that comes earlier in the list."""
    for stage in spec.stages:
        for key, target in references(stage):
            loc = f"{spec.path}:{stage.lines.get(key, stage.line)}"
            if target not in spec.names:
                close = difflib.get_close_matches(target, list(spec.names), n=1)
                raise ConfigError(f"{loc}: {stage.name}.{key} refers to ${{{target}}}, which is no stage"
                                  + (f"; did you mean ${{{close[0]}}}?" if close else
                                     f"; stages: {', '.join(spec.names)}"))
            if spec.names[target].index >= stage.index:
                raise ConfigError(f"{loc}: {stage.name}.{key} refers to ${{{target}}}, which runs later "
                                  f"(stage {spec.names[target].index}, this is stage {stage.index}): "
                                  f"move it earlier in stages")


def substitute(value, output_dirs: dict[str, Path]):
    """``${name}`` -> that stage's output directory, in strings and lists of strings."""
    if isinstance(value, list):
        return [substitute(v, output_dirs) for v in value]
    if isinstance(value, str):
        return REFERENCE.sub(lambda m: str(output_dirs[m.group(1)]), value)
    return value


def stage_config(spec: PipelineSpec, stage: StageSpec, fixed: dict[str, Any]):
    """The stage's config: its options (references resolved) and what the pipeline sets (``fixed``), checked
    against its config class with the pipeline file's lines."""
    clash = sorted(set(stage.options) & set(SET_BY_PIPELINE))
    if clash:
        line = stage.lines.get(clash[0], stage.line)
        raise ConfigError(f"{spec.path}:{line}: stage_configs.{stage.name}.{clash[0]} is set by the pipeline "
                          f"(output_dir/{stage.dir_name}, the chain's model and adapters); remove it, or set "
                          f"model_name_or_path / output_dir at the top of the file")
    fields = {f.name for f in dataclasses.fields(stage.config_class)}
    output_dirs = {s.name: Path(spec.output_dir) / s.dir_name for s in spec.stages}
    values = {k: substitute(v, output_dirs) for k, v in stage.options.items()}
    values.update({k: v for k, v in fixed.items() if k in fields})
    lines = {k: line for k, line in stage.lines.items() if line}
    try:
        return config_from_dict(stage.config_class, values, str(spec.path), lines, base_model=spec.model_name_or_path)
    except ConfigError as err:
        raise ConfigError(f"{_located(str(err), spec, stage)} [stage {stage.name}, {stage.recipe}]") from err
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{_located(f'{spec.path}: {err}', spec, stage)} [stage {stage.name}, "
                                f"{stage.recipe}]") from err


def _located(message: str, spec: PipelineSpec, stage: StageSpec) -> str:
    """``FILE: text`` -> ``FILE:LINE: text``, LINE being that of the first of the stage's options the text names
    (a config's own checks name fields, not lines), else the stage's line in ``stages``."""
    prefix = f"{spec.path}: "
    if not message.startswith(prefix):
        return message  # it has its line already
    text = message[len(prefix):]
    named = [(m.start(), stage.lines[k]) for k in stage.lines if stage.lines[k]
             for m in [re.search(rf"\b{re.escape(k)}\b", text)] if m]
    return f"{spec.path}:{min(named)[1] if named else stage.line}: {text}"
