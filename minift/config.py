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
import math
import os
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
    lines: dict[str, int] = {}
    for key, _ in node.value:
        line = key.start_mark.line + 1
        if key.value in lines:  # YAML itself lets the last one win, silently
            raise ConfigError(f"{path}:{line}: key {key.value!r} is given twice (first on line {lines[key.value]}); "
                              f"keep one")
        lines[key.value] = line
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


def run_settings(config) -> dict[str, Any]:
    """The settings that define what a run trains: every field but those declared ``resumable`` (in the class
    that declared the field, or any base), with existing paths resolved. ``eval_steps`` counts when early
    stopping is on (then evaluation decides where training ends)."""
    def resumable(name: str) -> bool:
        return any(getattr(k, "__dataclass_fields__", {}).get(name) is not None
                   and k.__dataclass_fields__[name].metadata.get("resumable") for k in type(config).__mro__)

    settings = {}
    for name, value in config_to_dict(config).items():
        if resumable(name) and not (name == "eval_steps" and getattr(config, "early_stopping_patience", 0)):
            continue
        if isinstance(value, str) and value and Path(value).expanduser().exists():
            value = str(Path(value).expanduser().resolve())
        settings[name] = value
    return settings


def check_paths(cfg, maybe_hub: tuple[str, ...], files: tuple[str, ...] = ()) -> None:
    """Fail before anything loads on a path that does not exist. ``files`` are always local; ``maybe_hub``
    values count as paths only when they look like one (``./x``, ``/x``, ``~/x`` or a data file name such as
    ``train.jsonl``), else they are hub names. The value ``auto`` is skipped."""
    from minift.data.read import FILE_SUFFIXES

    for name in maybe_hub + files:
        value = getattr(cfg, name)
        looks_local = value and (name in files or value.startswith((".", "/", "~"))
                                 or Path(value).suffix in FILE_SUFFIXES)
        if looks_local and value != "auto" and not Path(value).expanduser().exists():
            raise FileNotFoundError(f"{name}: {value} does not exist")


def _opt(default, help: str, *, resumable: bool = False):
    """A config field with its help text (``--help`` shows it with the default). ``resumable``: a resumed run may
    change it (it alters what is logged, saved or measured, not what is trained)."""
    metadata = {"help": help, "resumable": resumable}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _require(checks: list[tuple[bool, str]]) -> None:
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


# ----------------------------------------------------------------------------- config sections
# Each section declares its options once, with their help and their checks (``check``). A recipe's config
# composes the sections it needs with its own fields; TrainConfig.__post_init__ runs every section's check.


@dataclasses.dataclass
class ModelSection:
    model_name_or_path: str = _opt("tiny", "base model: directory, hub id, or 'tiny'")
    dtype: str = _opt("float32", "weights dtype: float32, bfloat16, float16")
    use_4bit: bool = _opt(False, "QLoRA: NF4 base (bitsandbytes)")
    use_8bit: bool = _opt(False, "8-bit base (bitsandbytes)")
    gradient_checkpointing: bool = _opt(False, "trade compute for memory")
    init_adapter: str | None = _opt(None, "start from this earlier adapter (frozen)")

    def check(self) -> None:
        _require([(not (self.use_4bit and self.use_8bit), "use_4bit and use_8bit are exclusive")])
        if self.init_adapter and not Path(self.init_adapter).is_dir():
            raise FileNotFoundError(f"init_adapter {self.init_adapter} does not exist")


@dataclasses.dataclass
class LoraSection:
    lora_r: int = _opt(16, "LoRA rank; 0 = full fine-tune")
    lora_alpha: float = _opt(32.0, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = _opt(0.0, "dropout on the LoRA input")
    target_modules: list[str] = _opt(["all-linear"], "module names, comma-separated, or all-linear")
    use_rslora: bool = _opt(False, "scale alpha / sqrt(r)")
    use_dora: bool = _opt(False, "weight-decomposed LoRA")

    def check(self) -> None:
        _require([
            (self.lora_r >= 0, f"lora_r must be >= 0 (0 = full fine-tune), got {self.lora_r}"),
            (self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha}"),
            (0 <= self.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {self.lora_dropout}"),
            (not ((getattr(self, "use_4bit", False) or getattr(self, "use_8bit", False)) and self.lora_r == 0),
             "a 4/8-bit base cannot be fully fine-tuned: set lora_r > 0"),
        ])


@dataclasses.dataclass
class OptimSection:
    num_train_epochs: float = _opt(3.0, "passes over the data (ignored if max_steps > 0)")
    max_steps: int = _opt(0, "optimizer steps; 0 = from num_train_epochs")
    per_device_train_batch_size: int = _opt(8, "rows per process per micro-batch")
    gradient_accumulation_steps: int = _opt(1, "micro-batches per optimizer step")
    learning_rate: float = _opt(3e-3, "peak learning rate")
    lr_scheduler_type: str = _opt("cosine", "cosine, linear or constant")
    warmup_ratio: float = _opt(0.0, "warm-up share of the steps")
    warmup_steps: int = _opt(0, "warm-up steps (overrides warmup_ratio)")
    weight_decay: float = _opt(0.0, "AdamW weight decay (not on biases/norms)")
    max_grad_norm: float = _opt(1.0, "gradient clipping; 0 = off")
    optim: str = _opt("adamw", "adamw, adamw_8bit or paged_adamw_8bit")
    seed: int = _opt(42, "seed for data order, init and dropout")
    mixed_precision: str | None = _opt(None, "no, bf16 or fp16; default: what `accelerate launch` says, else no")

    def check(self) -> None:
        _require([
            (self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}"),
            (self.num_train_epochs > 0 or self.max_steps > 0, "set num_train_epochs > 0 or max_steps > 0"),
            (math.isfinite(self.num_train_epochs) and math.isfinite(self.learning_rate),
             f"num_train_epochs and learning_rate must be finite, got {self.num_train_epochs}, {self.learning_rate}"),
            (self.max_steps >= 0, f"max_steps must be >= 0, got {self.max_steps}"),
            (self.per_device_train_batch_size >= 1, "per_device_train_batch_size must be >= 1"),
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
        ])


@dataclasses.dataclass
class EvalSection:
    validation_split: float = _opt(0.05, "share of the data held out for eval")
    per_device_eval_batch_size: int = _opt(16, "rows per process in evaluation", resumable=True)
    eval_steps: int = _opt(0, "evaluate every N steps; 0 = at the end only", resumable=True)
    early_stopping_patience: int = _opt(0, "stop after N evals without improvement")

    def check(self) -> None:
        _require([
            (0 <= self.validation_split < 1, f"validation_split must be in [0, 1), got {self.validation_split}"),
            (self.per_device_eval_batch_size >= 1, "per_device_eval_batch_size must be >= 1"),
            (self.eval_steps >= 0 and self.early_stopping_patience >= 0,
             "eval_steps and early_stopping_patience must be >= 0"),
        ])


@dataclasses.dataclass
class CheckpointSection:
    output_dir: str = _opt("out/run", "where checkpoints, adapter and logs go", resumable=True)
    overwrite_output_dir: bool = _opt(False, "start afresh in an output_dir that holds an earlier run "
                                             "(its checkpoints and logs are deleted)", resumable=True)
    save_steps: int = _opt(0, "checkpoint every N steps; 0 = only at the end", resumable=True)
    save_total_limit: int = _opt(0, "keep at most N checkpoints (best and newest kept)", resumable=True)
    resume_from_checkpoint: str | None = _opt(None, "a checkpoint dir or 'auto'", resumable=True)

    def check(self) -> None:
        out = Path(self.output_dir).expanduser()
        if out.exists() and not out.is_dir():
            raise ValueError(f"output_dir {out} is a file, not a directory")
        existing = next(p for p in (out, *out.absolute().parents) if p.exists())
        if not os.access(existing, os.W_OK):
            raise ValueError(f"output_dir {out}: {existing} is not writable")
        _require([(self.save_steps >= 0 and self.save_total_limit >= 0, "save_steps and save_total_limit must be >= 0"),
                  (not (self.overwrite_output_dir and self.resume_from_checkpoint),
                   "overwrite_output_dir and resume_from_checkpoint are exclusive: resume, or start afresh")])


@dataclasses.dataclass
class OutputSection:
    logging_steps: int = _opt(10, "log metrics every N steps", resumable=True)
    report_to: str = _opt("none", "none, tensorboard, wandb or mlflow", resumable=True)
    merge_output: bool = _opt(False, "also write a merged full model", resumable=True)
    push_to_hub: bool = _opt(False, "upload the result (token: HF_TOKEN)", resumable=True)
    hub_repo_id: str | None = _opt(None, "hub repository, e.g. me/my-adapter", resumable=True)
    hub_private: bool = _opt(True, "create the hub repository as private", resumable=True)
    push_adapter_only: bool = _opt(True, "push the adapter, not the merged model", resumable=True)
    hub_commit_message: str = _opt("Upload from minift", "the hub commit's message", resumable=True)

    def check(self) -> None:
        _require([
            (self.logging_steps >= 0, "logging_steps must be >= 0"),
            (self.report_to in ("none", "tensorboard", "wandb", "mlflow"),
             f"report_to must be none, tensorboard, wandb or mlflow, got {self.report_to!r}"),
            (not self.push_to_hub or bool(self.hub_repo_id), "push_to_hub needs hub_repo_id"),
        ])


@dataclasses.dataclass
class TrainConfig(OutputSection, CheckpointSection, EvalSection, OptimSection, LoraSection, ModelSection):
    """The sections every training recipe shares. Defaults run the bundled demo on the tiny model on CPU;
    for a real model start from ``recipes/configs/*.yaml`` (typical LoRA learning rates are ~1e-4..2e-4)."""

    def __post_init__(self) -> None:
        for klass in reversed(type(self).__mro__):  # sections first, then the recipe's own check
            if "check" in vars(klass):
                vars(klass)["check"](self)


@dataclasses.dataclass
class RolloutSection:
    """How an online recipe samples and scores completions (GRPO, PPO)."""

    max_completion_length: int = _opt(16, "new tokens per completion at most")
    temperature: float = _opt(1.0, "sampling temperature of the rollouts")
    top_p: float = _opt(1.0, "rollout nucleus sampling (1: off)")
    top_k: int = _opt(0, "rollout top-k (0: off)")
    min_p: float = _opt(0.0, "rollout min-p (0: off)")
    reward: list[str] = _opt(["exact_match"], "rewards: exact_match, partial_credit, think_format, length_penalty, "
                                              "module:function, file.py:function or a reward-model directory; "
                                              "comma-separated for several")
    reward_weights: list[float] | None = _opt(None, "one weight per reward, comma-separated (none given: 1 each)")

    def check(self) -> None:
        _require([(self.max_completion_length >= 1 and self.temperature > 0,
                   "max_completion_length must be >= 1 and temperature > 0")])


@dataclasses.dataclass
class DataSection:
    """Where a recipe's records come from and how they become tokens. ``DEMO_DATA`` / ``DEMO_EVAL``: the
    recipe's bundled demo files; ``answer_eval_dataset: auto`` means the demo eval set when training on the
    demo data."""

    DEMO_DATA: typing.ClassVar[Path | None] = None
    DEMO_EVAL: typing.ClassVar[Path | None] = None
    dataset_name_or_path: str = _opt("", "file, directory, saved dataset or hub name")
    eval_dataset: str | None = _opt(None, "explicit validation data (else validation_split)")
    dataset_format: str | None = _opt(None, "skip detection: messages, alpaca, text, preference, ...")
    skip_invalid: bool = _opt(False, "count and skip broken records instead of failing")
    chat_template: str | None = _opt(None, "a Jinja chat template file to use")
    max_seq_length: int = _opt(128, "tokens per example (prompt + answer) and per packed row")
    packing: bool = _opt(True, "examples as documents of one padding-free row, no cross-document attention "
                               "(false: padded rows)")
    pad_to_multiple_of: int = _opt(0, "padded rows (packing false): round each batch's length up to a multiple "
                                      "of N, e.g. 8 for GPU tensor cores; 0 = off")
    truncation: str = _opt("truncate", "truncate or drop over-long examples")
    answer_eval_dataset: str | None = _opt("auto", "prompts with answers for greedy exact match; "
                                                   "auto = demo eval with demo data", resumable=True)
    max_new_tokens: int = _opt(16, "generation budget of the exact-match eval", resumable=True)

    def check(self) -> None:
        _require([(self.truncation in ("truncate", "drop"), f"truncation must be truncate or drop, got {self.truncation!r}"),
                  (self.max_seq_length >= 2, f"max_seq_length must be >= 2, got {self.max_seq_length}"),
                  (self.pad_to_multiple_of >= 0, f"pad_to_multiple_of must be >= 0, got {self.pad_to_multiple_of}"),
                  (bool(self.dataset_name_or_path), "dataset_name_or_path is required")])
        check_paths(self, ("dataset_name_or_path", "eval_dataset", "answer_eval_dataset"), ("chat_template",))
        if self.answer_eval_dataset == "auto":
            demo = self.DEMO_DATA is not None and Path(self.dataset_name_or_path).resolve() == self.DEMO_DATA
            self.answer_eval_dataset = str(self.DEMO_EVAL) if demo and self.DEMO_EVAL else None
