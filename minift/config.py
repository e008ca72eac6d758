"""Typed configs: one dataclass per recipe, filled from defaults, then a YAML file, then CLI flags.

    python recipes/sft.py --config my.yaml --learning_rate 1e-4 --target_modules q_proj,v_proj

Every field is a flag (``--name value``; booleans also accept ``--name`` alone). Unknown keys
in YAML and unknown flags fail before anything is loaded, naming the file and line and the
closest valid key; values are converted to the field's type or rejected with the same detail.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
_TRUE, _FALSE = {"true", "yes", "1", "on"}, {"false", "no", "0", "off"}


class ConfigError(ValueError):
    """A bad key or value in a config file or on the command line."""


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _convert(value: Any, annotation: Any, where: str) -> Any:
    """Convert ``value`` (a YAML value or a CLI string) to ``annotation`` or raise ConfigError."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is list:
        (inner,) = args or (str,)
        items = value if isinstance(value, list) else [v.strip() for v in str(value).split(",") if v.strip()]
        return [_convert(v, inner, where) for v in items]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            number = annotation(value) if not isinstance(value, str) or annotation is float else int(value, 10)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {'an integer' if annotation is int else 'a number'}, "
                              f"got {value!r}") from None
        if annotation is int and isinstance(value, float) and value != number:
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return number
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _unknown_key(key: str, known: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(known))}"
    return ConfigError(f"{where}: unknown key {key!r}{hint}")


def read_yaml(path: str | Path) -> dict[str, tuple[Any, int]]:
    """A YAML mapping as ``{key: (value, line)}``; errors name the file and line."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: invalid YAML ({getattr(err, 'problem', err)})") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    lines = {k.value: k.start_mark.line + 1 for k, _ in node.value}
    return {k: (v, lines.get(k, 0)) for k, v in data.items()}


def _checked(cls, values: dict[str, Any], where: str, lines: dict[str, int] | None = None) -> dict[str, Any]:
    """Check keys against ``cls``'s fields and convert each value to its field's type."""
    types_ = _field_types(cls)
    out = {}
    for key, value in values.items():
        loc = f"{where}:{lines[key]}" if lines and lines.get(key) else where
        if key not in types_:
            raise _unknown_key(key, list(types_), loc)
        out[key] = _convert(value, types_[key], f"{loc}: {key}")
    return out


def _build(cls: type[T], kwargs: dict[str, Any], where: str) -> T:
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as err:  # __post_init__ checks name the field
        raise ConfigError(f"{where}: {err}") from err


def config_from_dict(cls: type[T], values: dict[str, Any], where: str = "config",
                     lines: dict[str, int] | None = None) -> T:
    """Build ``cls`` from a plain mapping (e.g. one stage of a pipeline file), checking keys and values."""
    return _build(cls, _checked(cls, values, where, lines), where)


def _glue_negative_numbers(argv: list[str]) -> list[str]:
    """``--learning_rate -1e-4`` -> ``--learning_rate=-1e-4``: argparse reads "-1e-4" as an unknown option."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and arg.startswith("-"):
            try:
                float(arg)
            except ValueError:
                pass
            else:
                out[-1] = f"{out[-1]}={arg}"
                continue
        out.append(arg)
    return out


def _flag_help(cls, f: dataclasses.Field) -> str:
    """A field's help text and default. A recipe that only changes a shared field's default (``learning_rate:
    float = 4e-3``) keeps the help written where the field was declared, in a base class."""
    text = ""
    for klass in cls.__mro__:  # the subclass first; the first class whose field has help wins
        declared = getattr(klass, "__dataclass_fields__", {}).get(f.name)
        if declared is not None and declared.metadata.get("help"):
            text = declared.metadata["help"]
            break
    if "default:" in text:  # the help already says what the default means
        return text
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if isinstance(default, list):
        default = ",".join(map(str, default))
    return f"{text} (default: {default})"


def parse_config(cls: type[T], argv: list[str] | None = None, description: str | None = None) -> T:
    """Defaults < ``--config FILE.yaml`` < CLI flags. Raises ConfigError (argparse exits on ``--help``)."""
    types_ = _field_types(cls)
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    parser.add_argument("--config", help="YAML file with any of the options below")
    for f in dataclasses.fields(cls):
        annotation = types_[f.name]
        kind = {bool: "BOOL", int: "INT", float: "FLOAT"}.get(annotation, "VALUE")
        flag = {"nargs": "?", "const": "true"} if annotation is bool else {}  # `--packing` alone means true
        parser.add_argument(f"--{f.name}", default=argparse.SUPPRESS, metavar=kind, help=_flag_help(cls, f), **flag)
    args, extra = parser.parse_known_args(_glue_negative_numbers(sys.argv[1:] if argv is None else list(argv)))
    if extra:  # argparse would only say "unrecognized arguments"; name the closest flag instead
        flag = next((a for a in extra if a.startswith("--")), None)
        if flag is None:
            raise ConfigError(f"command line: unexpected argument {extra[0]!r}; options are written --name value")
        name = flag[2:].split("=", 1)[0]
        close = difflib.get_close_matches(name, list(types_), n=1)
        hint = f"; did you mean --{close[0]}?" if close else "; see --help for the options"
        raise ConfigError(f"command line: unknown flag --{name}{hint}")
    args = vars(args)
    path = args.pop("config", None)
    values, where = {}, "command line"
    if path:
        where = str(path)
        raw = read_yaml(path)
        values = _checked(cls, {k: v for k, (v, _) in raw.items()}, where, {k: line for k, (_, line) in raw.items()})
    values.update({k: _convert(v, types_[k], f"--{k}") for k, v in args.items()})
    return _build(cls, values, where)


def config_to_dict(config) -> dict[str, Any]:
    """A JSON-safe dict of a config (what run.json records)."""
    return dataclasses.asdict(config)


def check_paths(cfg, maybe_hub: tuple[str, ...], files: tuple[str, ...] = ()) -> None:
    """Fail before anything loads on a path that does not exist. ``files`` are always local; ``maybe_hub``
    values count as paths only when they look like one (``./x``, ``/x``, ``~/x`` or a data file name such as
    ``train.jsonl``), else they are hub names. The value ``auto`` is skipped."""
    from minift.data import FILE_SUFFIXES

    for name in maybe_hub + files:
        value = getattr(cfg, name)
        looks_local = value and (name in files or value.startswith((".", "/", "~"))
                                 or Path(value).suffix in FILE_SUFFIXES)
        if looks_local and value != "auto" and not Path(value).expanduser().exists():
            raise FileNotFoundError(f"{name}: {value} does not exist")


def _help(text: str) -> dict:
    return {"help": text}


@dataclasses.dataclass
class TrainConfig:
    """Fields every training recipe shares. Defaults run the bundled demo on the tiny model on CPU;
    for a real model start from ``recipes/configs/*.yaml`` (typical LoRA learning rates are ~1e-4..2e-4)."""

    model_name_or_path: str = dataclasses.field(default="tiny", metadata=_help("base model: directory, hub id, or 'tiny'"))
    output_dir: str = dataclasses.field(default="out/run", metadata=_help("where checkpoints, adapter and logs go"))
    num_train_epochs: float = dataclasses.field(default=3.0, metadata=_help("passes over the data (ignored if max_steps > 0)"))
    max_steps: int = dataclasses.field(default=0, metadata=_help("optimizer steps; 0 = from num_train_epochs"))
    per_device_train_batch_size: int = dataclasses.field(default=8, metadata=_help("rows per process per micro-batch"))
    per_device_eval_batch_size: int = dataclasses.field(default=16, metadata=_help("rows per process in evaluation"))
    gradient_accumulation_steps: int = dataclasses.field(default=1, metadata=_help("micro-batches per optimizer step"))
    learning_rate: float = dataclasses.field(default=3e-3, metadata=_help("peak learning rate"))
    lr_scheduler_type: str = dataclasses.field(default="cosine", metadata=_help("cosine, linear or constant"))
    warmup_ratio: float = dataclasses.field(default=0.0, metadata=_help("warm-up share of the steps"))
    warmup_steps: int = dataclasses.field(default=0, metadata=_help("warm-up steps (overrides warmup_ratio)"))
    weight_decay: float = dataclasses.field(default=0.0, metadata=_help("AdamW weight decay (not on biases/norms)"))
    max_grad_norm: float = dataclasses.field(default=1.0, metadata=_help("gradient clipping; 0 = off"))
    optim: str = dataclasses.field(default="adamw", metadata=_help("adamw, adamw_8bit or paged_adamw_8bit"))
    seed: int = dataclasses.field(default=42, metadata=_help("seed for data order, init and dropout"))
    dtype: str = dataclasses.field(default="float32", metadata=_help("weights dtype: float32, bfloat16, float16"))
    mixed_precision: str | None = dataclasses.field(
        default=None, metadata=_help("no, bf16 or fp16; default: what `accelerate launch` says, else no"))
    lora_r: int = dataclasses.field(default=16, metadata=_help("LoRA rank; 0 = full fine-tune"))
    lora_alpha: float = dataclasses.field(default=32.0, metadata=_help("LoRA alpha (scale = alpha / r)"))
    lora_dropout: float = dataclasses.field(default=0.0, metadata=_help("dropout on the LoRA input"))
    target_modules: list[str] = dataclasses.field(default_factory=lambda: ["all-linear"],
                                                  metadata=_help("module names, comma-separated, or all-linear"))
    use_rslora: bool = dataclasses.field(default=False, metadata=_help("scale alpha / sqrt(r)"))
    use_dora: bool = dataclasses.field(default=False, metadata=_help("weight-decomposed LoRA"))
    use_4bit: bool = dataclasses.field(default=False, metadata=_help("QLoRA: NF4 base (bitsandbytes)"))
    use_8bit: bool = dataclasses.field(default=False, metadata=_help("8-bit base (bitsandbytes)"))
    gradient_checkpointing: bool = dataclasses.field(default=False, metadata=_help("trade compute for memory"))
    init_adapter: str | None = dataclasses.field(default=None, metadata=_help("start from this earlier adapter (frozen)"))
    validation_split: float = dataclasses.field(default=0.05, metadata=_help("share of the data held out for eval"))
    eval_steps: int = dataclasses.field(default=0, metadata=_help("evaluate every N steps; 0 = at the end only"))
    early_stopping_patience: int = dataclasses.field(default=0, metadata=_help("stop after N evals without improvement"))
    save_steps: int = dataclasses.field(default=0, metadata=_help("checkpoint every N steps; 0 = only at the end"))
    save_total_limit: int = dataclasses.field(default=0, metadata=_help("keep at most N checkpoints (best and newest kept)"))
    resume_from_checkpoint: str | None = dataclasses.field(default=None, metadata=_help("a checkpoint dir or 'auto'"))
    logging_steps: int = dataclasses.field(default=10, metadata=_help("log metrics every N steps"))
    report_to: str = dataclasses.field(default="none", metadata=_help("none, tensorboard, wandb or mlflow"))
    merge_output: bool = dataclasses.field(default=False, metadata=_help("also write a merged full model"))
    push_to_hub: bool = dataclasses.field(default=False, metadata=_help("upload the result (token: HF_TOKEN)"))
    hub_repo_id: str | None = dataclasses.field(default=None, metadata=_help("hub repository, e.g. me/my-adapter"))
    hub_private: bool = dataclasses.field(default=True, metadata=_help("create the hub repository as private"))
    push_adapter_only: bool = dataclasses.field(default=True, metadata=_help("push the adapter, not the merged model"))

    def __post_init__(self) -> None:
        checks = [
            (self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}"),
            (self.num_train_epochs > 0 or self.max_steps > 0, "set num_train_epochs > 0 or max_steps > 0"),
            (self.max_steps >= 0, f"max_steps must be >= 0, got {self.max_steps}"),
            (self.per_device_train_batch_size >= 1, "per_device_train_batch_size must be >= 1"),
            (self.per_device_eval_batch_size >= 1, "per_device_eval_batch_size must be >= 1"),
            (self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be >= 1"),
            (self.lr_scheduler_type in ("cosine", "linear", "constant"),
             f"lr_scheduler_type must be cosine, linear or constant, got {self.lr_scheduler_type!r}"),
            (0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}"),
            (self.warmup_steps >= 0 and self.weight_decay >= 0 and self.max_grad_norm >= 0,
             "warmup_steps, weight_decay and max_grad_norm must be >= 0"),
            (self.optim in ("adamw", "adamw_8bit", "paged_adamw_8bit"),
             f"optim must be adamw, adamw_8bit or paged_adamw_8bit, got {self.optim!r}"),
            (self.mixed_precision in (None, "no", "bf16", "fp16"),
             f"mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}"),
            (self.lora_r >= 0, f"lora_r must be >= 0 (0 = full fine-tune), got {self.lora_r}"),
            (self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha}"),
            (0 <= self.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {self.lora_dropout}"),
            (not (self.use_4bit and self.use_8bit), "use_4bit and use_8bit are exclusive"),
            (not ((self.use_4bit or self.use_8bit) and self.lora_r == 0),
             "a 4/8-bit base cannot be fully fine-tuned: set lora_r > 0"),
            (0 <= self.validation_split < 1, f"validation_split must be in [0, 1), got {self.validation_split}"),
            (self.report_to in ("none", "tensorboard", "wandb", "mlflow"),
             f"report_to must be none, tensorboard, wandb or mlflow, got {self.report_to!r}"),
            (not self.push_to_hub or bool(self.hub_repo_id), "push_to_hub needs hub_repo_id"),
            (self.eval_steps >= 0 and self.save_steps >= 0 and self.save_total_limit >= 0
             and self.logging_steps >= 0 and self.early_stopping_patience >= 0,
             "eval_steps, save_steps, save_total_limit, logging_steps and early_stopping_patience must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.init_adapter and not Path(self.init_adapter).is_dir():
            raise FileNotFoundError(f"init_adapter {self.init_adapter} does not exist")
