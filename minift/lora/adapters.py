"""Save and load adapters in the PEFT on-disk format (``minift.lora.merge`` combines and merges them).

Files: ``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.<module path>.lora_A.weight`` (``[r, in]``), ``.lora_B.weight`` (``[out, r]``),
``.lora_magnitude_vector`` (DoRA, ``[out]``) and full ``modules_to_save`` tensors under their
plain paths. peft, vLLM and llama.cpp's converter read these; minift reads peft's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from minift import __version__
from minift.constants import DEFAULT_ADAPTER
from minift.lora.config import LoraConfig
from minift.lora.layers import (
    adapter_configs,
    apply_lora,
    find_targets,
    lora_layers,
    saved_modules,
    set_trainable,
)
from minift.lora.weights import base_kind, layer_features
from minift.model.files import check_safetensors, set_usual_modes

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
# Config fields that decide what a model computes; dtype, quantization and paths do not.
_FINGERPRINT_FIELDS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "n_embd", "n_layer", "n_head", "n_inner", "tie_word_embeddings",
)


@contextlib.contextmanager
def atomic_directory(out_dir: str | Path) -> Iterator[Path]:
    """Yield a temp dir next to ``out_dir``; on success it replaces ``out_dir`` in one rename."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        set_usual_modes(tmp)
        old = None
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def base_fingerprint(config) -> str:
    """A short hash of the base model's shape-defining config fields (independent of dtype/quantization)."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    picked = {k: d[k] for k in _FINGERPRINT_FIELDS if d.get(k) is not None}
    return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]


def adapter_state_dict(model: nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT key names (no adapter name in the keys)."""
    state = {}
    for path, layer in lora_layers(model):
        if adapter_name not in layer.lora_A:
            continue
        state[f"{PREFIX}{path}.lora_A.weight"] = layer.lora_A[adapter_name].weight
        state[f"{PREFIX}{path}.lora_B.weight"] = layer.lora_B[adapter_name].weight
        if adapter_name in layer.lora_magnitude_vector:
            state[f"{PREFIX}{path}.lora_magnitude_vector"] = layer.lora_magnitude_vector[adapter_name]
    for path, wrapper in saved_modules(model):
        if adapter_name in wrapper.modules_to_save:
            # its tensors as they are now, not state_dict(): under FSDP that would swap in the shards
            copy = wrapper.modules_to_save[adapter_name]
            for key, value in [*copy.named_parameters(), *copy.named_buffers()]:
                state[f"{PREFIX}{path}.{key}"] = value
    if not state:
        raise ValueError(f"the model has no adapter named {adapter_name!r}; it has {list(adapter_configs(model))}")
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def _peft_config_json(config: LoraConfig, targets: list[str], base: str | None, minift_block: dict,
                      task_type: str) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base,
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "bias": "none",
        "fan_in_fan_out": False,  # minift stores A/B in Linear orientation for Conv1D too, as peft does
        "target_modules": targets,
        "exclude_modules": None,
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "modules_to_save": config.modules_to_save,
        "rank_pattern": config.rank_pattern,
        "alpha_pattern": config.alpha_pattern,
        "init_lora_weights": config.init_lora_weights,
        "inference_mode": True,
        "minift": minift_block,
    }


def task_type(model: nn.Module) -> str:
    """peft's ``task_type`` of a model: ``SEQ_CLS`` for a sequence-classification head, else ``CAUSAL_LM``."""
    return "SEQ_CLS" if type(model).__name__.endswith("ForSequenceClassification") else "CAUSAL_LM"


def save_adapter(
    model: nn.Module,
    out_dir: str | Path,
    *,
    adapter_name: str = DEFAULT_ADAPTER,
    base_model_name_or_path: str | None = None,
    stage: str | None = None,
    parents: list[str] | None = None,
) -> Path:
    """Write adapter ``adapter_name`` of ``model`` to ``out_dir`` in the PEFT format (atomically)."""
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise ValueError(f"the model has no adapter named {adapter_name!r}; it has {list(configs)}")
    config = configs[adapter_name]
    state = adapter_state_dict(model, adapter_name)
    targets = sorted(path for path, layer in lora_layers(model) if adapter_name in layer.lora_A)
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None)
    block = {
        "version": __version__,
        "stage": stage,
        "parents": list(parents or []),
        "base_fingerprint": base_fingerprint(model.config) if hasattr(model, "config") else None,
    }
    with atomic_directory(out_dir) as tmp:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(
            json.dumps(_peft_config_json(config, targets, base_model_name_or_path, block, task_type(model)), indent=2)
            + "\n"
        )
    return Path(out_dir)


def read_adapter(adapter_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and check an adapter directory: (config dict, tensors). Raises with the file and the fix."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise FileNotFoundError(f"adapter directory {adapter_dir} does not exist")
    config_path, weights_path = adapter_dir / CONFIG_NAME, adapter_dir / WEIGHTS_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{adapter_dir} is not an adapter: {CONFIG_NAME} is missing")
    if not weights_path.is_file():
        hint = " (only safetensors are read; re-save the adapter with safetensors)" if (
            adapter_dir / "adapter_model.bin").exists() else ""
        raise FileNotFoundError(f"{adapter_dir} has no {WEIGHTS_NAME}{hint}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path}, line {err.lineno}: invalid JSON ({err.msg})") from err
    _check_config(config, config_path)
    check_safetensors(weights_path)
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{weights_path} is not a readable safetensors file ({err}); the file is corrupt "
                         f"or truncated: save the adapter again") from err
    if not tensors:
        raise ValueError(f"{weights_path} holds no tensors")
    return config, tensors


def _split_keys(config: dict, tensors: dict[str, torch.Tensor], where: Path) -> tuple[dict, dict]:
    """Group tensors by module path: ({path: {'A','B','m'}}, {saved-module path: {param: tensor}})."""
    lora, full = {}, {}
    saved_names = config.get("modules_to_save") or []
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise ValueError(f"{where}: tensor {key!r} does not start with {PREFIX!r}; not a PEFT-format adapter")
        key = key[len(PREFIX):]
        if "lora_embedding_" in key:
            raise ValueError(f"{where}: {key} is an embedding LoRA, which minift does not support")
        m = re.fullmatch(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?)", key)
        if m:
            part = {"lora_A.weight": "A", "lora_B.weight": "B"}.get(m.group(2), "m")
            lora.setdefault(m.group(1), {})[part] = value
            continue
        owner = next((k for k in _module_prefixes(key) if any(k == s or k.endswith("." + s) for s in saved_names)), None)
        if owner is None:
            raise ValueError(f"{where}: unexpected tensor {PREFIX}{key} (not a LoRA weight nor a modules_to_save entry)")
        full.setdefault(owner, {})[key[len(owner) + 1:]] = value
    for path, parts in lora.items():
        if "A" not in parts or "B" not in parts:
            raise ValueError(f"{where}: module {path} has {sorted(parts)} but needs both lora_A and lora_B")
    return lora, full


def _check_config(config, path: Path) -> None:
    """The fields minift reads, with the types peft writes: one error naming the file and the field."""
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object (an adapter config), got a JSON {type(config).__name__}")
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type is {config['peft_type']!r}; minift reads LoRA adapters only")
    for key in ("r", "lora_alpha"):
        if key not in config:
            raise ValueError(f"{path}: required field {key!r} is missing")

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    def rank(v):
        return number(v) and isinstance(v, int) and v > 0

    rules = {  # field: (check, what it must be); absent or null fields take their defaults
        "r": (rank, "a positive integer"),
        "lora_alpha": (lambda v: number(v) and v > 0, "a positive number"),
        "lora_dropout": (lambda v: number(v) and 0 <= v < 1, "a number in [0, 1)"),
        "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
        "use_dora": (lambda v: isinstance(v, bool), "true or false"),
        "rank_pattern": (lambda v: isinstance(v, dict) and all(map(rank, v.values())),
                         "an object mapping module patterns to positive integers"),
        "alpha_pattern": (lambda v: isinstance(v, dict) and all(number(a) for a in v.values()),
                          "an object mapping module patterns to numbers"),
        "modules_to_save": (lambda v: isinstance(v, list) and all(isinstance(m, str) for m in v),
                            "a list of module names"),
    }
    for key, (ok, what) in rules.items():
        if config.get(key) is not None and not ok(config[key]):
            raise ValueError(f"{path}: field {key!r} must be {what}, got {config[key]!r}")


def _module_prefixes(key: str) -> list[str]:
    parts = key.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


def _lora_config_from_json(config: dict, targets: list[str]) -> LoraConfig:
    return LoraConfig(
        r=config["r"],
        lora_alpha=float(config["lora_alpha"]),
        lora_dropout=float(config.get("lora_dropout") or 0.0),
        target_modules=targets,
        use_rslora=bool(config.get("use_rslora", False)),
        use_dora=bool(config.get("use_dora", False)),
        rank_pattern=dict(config.get("rank_pattern") or {}),
        alpha_pattern=dict(config.get("alpha_pattern") or {}),
        modules_to_save=config.get("modules_to_save") or None,
    )


def load_adapter(
    model: nn.Module,
    adapter_dir: str | Path,
    *,
    adapter_name: str = DEFAULT_ADAPTER,
    trainable: bool = False,
    check_base: bool = True,
) -> LoraConfig:
    """Load a PEFT-format adapter (minift's or peft's) into ``model`` as ``adapter_name``.

    If the model already has an adapter of that name and layout (a resumed run), its weights are
    overwritten in place, so optimizer state keeps pointing at the same parameters.

    Every tensor must land on a module of the right shape and rank, or this raises: an adapter
    that silently does nothing is the worst outcome. ``check_base`` compares the base fingerprint
    minift records with the model's (skipped for adapters written by other tools).
    """
    adapter_dir = Path(adapter_dir)
    config, tensors = read_adapter(adapter_dir)
    block = config.get("minift") or {}
    if check_base and block.get("base_fingerprint") and hasattr(model, "config"):
        ours = base_fingerprint(model.config)
        if block["base_fingerprint"] != ours:
            raise ValueError(
                f"{adapter_dir} was trained on a different base model ({config.get('base_model_name_or_path')}, "
                f"fingerprint {block['base_fingerprint']}) than the one given (fingerprint {ours}). Load it onto "
                f"the base it was trained on, or pass check_base=False if you know they match."
            )
    lora, full = _split_keys(config, tensors, adapter_dir / WEIGHTS_NAME)
    layers = dict(lora_layers(model))
    modules = dict(model.named_modules())
    unknown = [p for p in lora if p not in layers and p not in modules]
    if unknown:
        raise ValueError(
            f"{adapter_dir}: {len(unknown)} adapter module(s) match no module of {type(model).__name__}, e.g. "
            f"{unknown[0]!r}. The adapter was made for a different architecture."
        )
    lora_config = _lora_config_from_json(config, sorted(lora))
    for path, parts in lora.items():
        module = layers[path].base_layer if path in layers else modules[path]
        _check_shapes(adapter_dir, path, parts, module, lora_config.rank_for(path))
    _check_complete(adapter_dir, model, config, lora)
    if adapter_name in adapter_configs(model):  # restore weights into an adapter of the same shape (resume)
        _check_same_adapter(adapter_dir, model, adapter_name, lora)
        if trainable:
            set_trainable(model, [adapter_name])
    else:
        apply_lora(model, lora_config, adapter_name=adapter_name, trainable=trainable)
    layers = dict(lora_layers(model))
    with torch.no_grad():
        for path, parts in lora.items():
            layer = layers[path]
            layer.lora_A[adapter_name].weight.copy_(parts["A"])
            layer.lora_B[adapter_name].weight.copy_(parts["B"])
            if "m" in parts:
                if adapter_name not in layer.lora_magnitude_vector:
                    raise ValueError(f"{adapter_dir}: {path} has a DoRA magnitude but use_dora is false in the config")
                layer.lora_magnitude_vector[adapter_name].copy_(parts["m"])
        for path, wrapper in saved_modules(model):
            if adapter_name not in wrapper.modules_to_save:
                continue
            if path not in full:
                raise ValueError(f"{adapter_dir}: modules_to_save module {path} has no tensors in the file")
            wrapper.modules_to_save[adapter_name].load_state_dict(full[path], strict=True)
    return lora_config


def _check_same_adapter(where: Path, model: nn.Module, adapter_name: str, lora: dict) -> None:
    have = {path for path, layer in lora_layers(model) if adapter_name in layer.lora_A}
    if have != set(lora):
        raise ValueError(f"{where} covers {len(lora)} modules but the model's adapter {adapter_name!r} covers "
                         f"{len(have)}; they are not the same adapter layout")
    for path, layer in lora_layers(model):
        if path in lora and layer.lora_A[adapter_name].weight.shape != lora[path]["A"].shape:
            raise ValueError(f"{where}: {path} has rank {lora[path]['A'].shape[0]}, the model's adapter "
                             f"{layer.lora_A[adapter_name].weight.shape[0]}")


def _check_shapes(where: Path, path: str, parts: dict, module: nn.Module, rank: int) -> None:
    kind = base_kind(module)
    if kind is None:
        raise ValueError(f"{where}: {path} is a {type(module).__name__}, not a linear layer LoRA can wrap")
    in_f, out_f = layer_features(module, kind)
    a, b = parts["A"], parts["B"]
    if a.shape[0] != rank or b.shape[1] != rank:
        raise ValueError(
            f"{where}: wrong rank for {path}: the config gives r={rank} but lora_A is {list(a.shape)} and lora_B is "
            f"{list(b.shape)}. The config and the weights do not belong together."
        )
    if a.shape[1] != in_f or b.shape[0] != out_f:
        raise ValueError(
            f"{where}: shape mismatch for {path}: the adapter maps {a.shape[1]} -> {b.shape[0]} features but the "
            f"model's layer maps {in_f} -> {out_f}. The adapter was trained on a different base model."
        )
    if "m" in parts and parts["m"].shape[0] != out_f:
        raise ValueError(f"{where}: DoRA magnitude of {path} has {parts['m'].shape[0]} entries, the layer {out_f}")


def _check_complete(where: Path, model: nn.Module, config: dict, lora: dict) -> None:
    # A config that targets modules absent from the file means a truncated or mismatched save.
    spec = config.get("target_modules")
    if not spec:
        return
    try:
        expected = find_targets(model, LoraConfig(r=1, target_modules=spec,
                                                  exclude_modules=config.get("exclude_modules"),
                                                  modules_to_save=config.get("modules_to_save")))
    except ValueError:
        expected = []
    missing = sorted(set(expected) - set(lora))
    if missing:
        raise ValueError(f"{where}: the config targets {len(missing)} module(s) with no weights in the file, "
                         f"e.g. {missing[0]}; the adapter file is incomplete")
