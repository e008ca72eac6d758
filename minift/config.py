"""Typed configs: one dataclass per recipe, filled from defaults, then a YAML file, then CLI flags.

    python recipes/sft.py --config my.yaml --learning_rate 1e-4 --target_modules q_proj,v_proj

Every field is a flag (``--name value``; booleans also accept ``--name`` alone). Unknown keys
in YAML and unknown flags fail before anything is loaded, naming the file and line and the
closest valid key; values are converted to the field's type or rejected with the same detail.
"""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import difflib
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
DRY_RUN_HELP = ("--dry_run: check the options, every record of the data and the model paths, print the examples and "
                "steps, and stop; no weights load")
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


def read_text_file(path: Path, what: str) -> str:
    """A user's text file as UTF-8, a byte-order mark (Notepad, Excel) dropped; ``what`` names it in the errors."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return path.read_bytes().removeprefix(codecs.BOM_UTF8).decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{what} {path}: not valid UTF-8 ({err.reason} at byte {err.start})") from None


def load_yaml(path: str | Path) -> tuple[dict, dict[tuple, int]]:
    """A YAML mapping, and the 1-based line of every key and list item by its path (``("stages", 0, "name")``).
    Errors name the file and line; a key given twice at any depth is one (YAML itself lets the last one win,
    silently)."""
    import yaml

    path = Path(path)
    text = read_text_file(path, "config file")
    try:
        node = yaml.compose(text)
        _check_yaml_graph(node, str(path))  # before anything expands the aliases
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: invalid YAML ({getattr(err, 'problem', err)})") from err
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply to be a config file") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data, _yaml_lines(node, str(path))


YAML_NODE_LIMIT = 100_000  # nodes of a config file with its aliases expanded; real configs have a few hundred


def _check_yaml_graph(node, where: str) -> None:
    """Refuse a YAML document whose aliases refer to a node containing them (a cycle) or expand it beyond
    ``YAML_NODE_LIMIT`` nodes (a "billion laughs" bomb): both would hang or exhaust memory when walked."""
    import yaml

    seen, active = 0, set()

    def visit(n) -> None:
        nonlocal seen
        seen += 1
        if seen > YAML_NODE_LIMIT:
            raise ConfigError(f"{where}: the YAML expands to more than {YAML_NODE_LIMIT:,} values through its aliases "
                              f"(*name); a config file this large is a mistake or an attack")
        if id(n) in active:
            raise ConfigError(f"{where}:{n.start_mark.line + 1}: a YAML alias refers to a value that contains it")
        if isinstance(n, (yaml.MappingNode, yaml.SequenceNode)):
            active.add(id(n))
            for child in (c for pair in n.value for c in pair) if isinstance(n, yaml.MappingNode) else n.value:
                visit(child)
            active.discard(id(n))

    if node is not None:
        visit(node)


def _yaml_lines(node, where: str, prefix: tuple = ()) -> dict[tuple, int]:
    import yaml

    out: dict[tuple, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            path, line = prefix + (key.value,), key.start_mark.line + 1
            if path in out:
                raise ConfigError(f"{where}:{line}: key {'.'.join(map(str, path))!r} is given twice (first on line "
                                  f"{out[path]}); keep one")
            out[path] = line
            out.update(_yaml_lines(value, where, path))
    elif isinstance(node, yaml.SequenceNode):
        for i, value in enumerate(node.value):
            out[prefix + (i,)] = value.start_mark.line + 1
            out.update(_yaml_lines(value, where, prefix + (i,)))
    return out


def read_yaml(path: str | Path) -> dict[str, tuple[Any, int]]:
    """A YAML mapping as ``{key: (value, line)}`` (see :func:`load_yaml`)."""
    data, lines = load_yaml(path)
    return {k: (v, lines.get((k,), 0)) for k, v in data.items()}


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


def _build(cls: type[T], kwargs: dict[str, Any], where: str, base_model: str | None = None) -> T:
    """``cls(**kwargs)``, after the class's defaults for the base model (``cls.defaults_for(model)``, if it has one;
    ``base_model``, else the ``model_name_or_path`` given or declared) fill in what ``kwargs`` leaves unset."""
    if hasattr(cls, "defaults_for"):
        model = base_model or kwargs.get("model_name_or_path") or cls.__dataclass_fields__["model_name_or_path"].default
        kwargs = {**cls.defaults_for(model), **kwargs}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as err:  # __post_init__ checks name the field
        raise ConfigError(f"{where}: {err}") from err


def config_from_dict(cls: type[T], values: dict[str, Any], where: str = "config",
                     lines: dict[str, int] | None = None, base_model: str | None = None) -> T:
    """Build ``cls`` from a plain mapping (e.g. one stage of a pipeline file), checking keys and values.
    ``base_model``: the model whose defaults apply when it is not the config's own ``model_name_or_path`` (a
    pipeline stage that starts from an earlier stage's merged model keeps the defaults of the pipeline's base)."""
    return _build(cls, _checked(cls, values, where, lines), where, base_model)


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


def field_default(f: dataclasses.Field):
    """A dataclass field's default value (a fresh one for a ``default_factory``)."""
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


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
    default = field_default(f)
    if isinstance(default, list):
        default = ",".join(map(str, default))
    real = getattr(cls, "REAL_MODEL", {})
    if f.name in real and real[f.name] != default:
        return f"{text} (default: {default} on the tiny demo model, {real[f.name]} on any other)"
    return f"{text} (default: {default})"


def parse_config(cls: type[T], argv: list[str] | None = None, description: str | None = None) -> T:
    """Defaults < ``--config FILE.yaml`` < CLI flags. Raises ConfigError (argparse exits on ``--help``)."""
    types_ = _field_types(cls)
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False, epilog=DRY_RUN_HELP)
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


def opt(default, help: str, *, resumable: bool = False):
    """A config field with its help text (``--help`` shows it with the default). ``resumable``: a resumed run may
    change it (it alters what is logged, saved or measured, not what is trained)."""
    metadata = {"help": help, "resumable": resumable}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def require(checks: list[tuple[bool, str]]) -> None:
    """Raise ``ValueError(message)`` for the first ``(ok, message)`` that is not ok: a config's ``check``."""
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
