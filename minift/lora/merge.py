"""Adapters folded into weights: a chain of adapters into one exact adapter (``combine_adapters``); adapters into
the base weights in place (``merge_lora`` / ``unmerge_lora``), or into a copy for the length of a block
(``folded_adapters``, for sampling); a plain Hugging Face model without the wrappers (``unwrap_lora``), saved by
``merge_and_save``."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from minift import __version__
from minift.lora.adapters import (
    CONFIG_NAME,
    PREFIX,
    WEIGHTS_NAME,
    _lora_config_from_json,
    _peft_config_json,
    _split_keys,
    atomic_directory,
    load_adapter,
    read_adapter,
)
from minift.lora.config import LoraConfig
from minift.lora.layers import _set_module, lora_layers, saved_modules
from minift.lora.weights import dequantized_weight

logger = logging.getLogger(__name__)


def combine_adapters(adapter_dirs: list[str | Path], out_dir: str | Path, *, stage: str = "combined") -> Path:
    """Fold a chain of adapters (applied together) into one exact adapter of rank r1 + r2 + ...

    ``ΔW = Σ s_i B_i A_i = [s_1 B_1, s_2 B_2, ...] @ [A_1; A_2; ...]``: A rows are stacked, B columns
    are stacked with each scale folded in, and the result has scale 1 (alpha = r per module).
    For ``modules_to_save`` the last adapter's copy wins, as when the chain is applied.
    """
    if not adapter_dirs:
        raise ValueError("combine_adapters needs at least one adapter directory")
    per_module: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    saved: dict[str, torch.Tensor] = {}
    saved_names: list[str] = []
    configs = []
    for adapter_dir in adapter_dirs:
        config, tensors = read_adapter(adapter_dir)
        if config.get("use_dora"):
            raise ValueError(f"{adapter_dir} is a DoRA adapter; DoRA's normalization cannot be combined exactly. "
                             f"Merge the chain into the base instead (tools/merge_adapter.py).")
        configs.append(config)
        lora, full = _split_keys(config, tensors, Path(adapter_dir) / WEIGHTS_NAME)
        cfg = _lora_config_from_json(config, sorted(lora))
        for path, parts in lora.items():
            r = parts["A"].shape[0]
            alpha = cfg.alpha_for(path)
            scale = alpha / math.sqrt(r) if cfg.use_rslora else alpha / r
            per_module.setdefault(path, []).append((parts["A"].float(), parts["B"].float() * scale))
        for owner, params in full.items():
            for key, value in params.items():
                saved[f"{PREFIX}{owner}.{key}"] = value
        saved_names += [n for n in (config.get("modules_to_save") or []) if n not in saved_names]
    state, ranks = {}, {}
    for path, pairs in per_module.items():
        state[f"{PREFIX}{path}.lora_A.weight"] = torch.cat([a for a, _ in pairs], dim=0).contiguous()
        state[f"{PREFIX}{path}.lora_B.weight"] = torch.cat([b for _, b in pairs], dim=1).contiguous()
        ranks[path] = sum(a.shape[0] for a, _ in pairs)
    state.update(saved)
    r = max(ranks.values())
    patterns = {re.escape(p): k for p, k in ranks.items() if k != r}
    config = LoraConfig(r=r, lora_alpha=float(r), target_modules=sorted(ranks), rank_pattern=patterns,
                        alpha_pattern={k: float(v) for k, v in patterns.items()}, modules_to_save=saved_names or None)
    block = {
        "version": __version__,
        "stage": stage,
        "parents": [str(d) for d in adapter_dirs],
        "base_fingerprint": (configs[0].get("minift") or {}).get("base_fingerprint"),
    }
    with atomic_directory(out_dir) as tmp:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        body = _peft_config_json(config, sorted(ranks), configs[0].get("base_model_name_or_path"), block,
                                 configs[-1].get("task_type", "CAUSAL_LM"))
        (tmp / CONFIG_NAME).write_text(json.dumps(body, indent=2) + "\n")
    return Path(out_dir)


def merge_and_save(
    base_model_name_or_path: str,
    adapter_dirs: list[str | Path],
    out_dir: str | Path,
    *,
    dtype: str = "float32",
    max_shard_size: str = "2GB",
) -> Path:
    """Load the full-precision base, apply and merge the adapters in order, write a plain HF model dir.

    The result (sharded safetensors + tokenizer) loads with ``AutoModelForCausalLM`` alone, or with
    ``AutoModelForSequenceClassification`` when the last adapter is a reward model's (``task_type`` SEQ_CLS, its
    head among ``modules_to_save``). Adapters trained on a 4-bit base merge here into the unquantized base,
    which is exact.
    """
    from minift.model.load import load_model_and_tokenizer

    configs = [read_adapter(d)[0] for d in adapter_dirs]  # every adapter checked before the base loads
    task = "seq_cls" if configs and configs[-1].get("task_type") == "SEQ_CLS" else "causal_lm"
    model, tokenizer = load_model_and_tokenizer(base_model_name_or_path, dtype=dtype, task=task)
    for i, adapter_dir in enumerate(adapter_dirs):
        load_adapter(model, adapter_dir, adapter_name=f"stage{i}")
    merge_lora(model)
    unwrap_lora(model)
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


@contextlib.contextmanager
def folded_adapters(model: nn.Module):
    """For the block, the model runs as a plain transformers model: each full-precision LoRA layer is replaced by
    its base layer, computing with its enabled adapters folded into a copy of its weight. That is one matrix
    product a layer instead of three, and no adapter code: most of a decoding step's overhead on a real model
    (SmolLM2 in bf16 on a CPU: 120 -> 85 ms). At the end the wrappers and the original weights come back, bit for
    bit; quantized bases keep their adapters unfolded. While it lasts the adapted layers' weights exist twice, so
    use it for sampling, where no activations are kept for a backward pass."""
    swapped = []
    try:
        with torch.no_grad():
            for path, layer in list(lora_layers(model)):
                if layer.kind not in ("linear", "conv1d"):
                    continue
                weight, names = layer.base_layer.weight, layer.active()
                swapped.append((path, layer, weight.data))
                if names:
                    w = dequantized_weight(layer.base_layer, layer.kind).float()
                    for name in names:
                        w = layer._merged_weight_for(name, w)[0]
                    weight.data = (w.t() if layer.kind == "conv1d" else w).to(weight.dtype).contiguous()
                _set_module(model, path, layer.base_layer)
        yield model
    finally:
        for path, layer, data in swapped:
            layer.base_layer.weight.data = data
            _set_module(model, path, layer)


def merge_lora(model: nn.Module, names: list[str] | None = None) -> None:
    """Fold adapters into the base weights (4/8-bit bases: dequantize, add, re-quantize: lossy)."""
    layers = list(lora_layers(model))
    if any(layer.kind in ("bnb4", "bnb8") for _, layer in layers):
        logger.warning(
            "merging into a quantized base re-quantizes the weights, which rounds them: outputs will differ "
            "slightly from the unmerged model. For deployment merge into the full-precision base instead."
        )
    for _, layer in layers:
        layer.merge(names)


def unmerge_lora(model: nn.Module) -> None:
    """Undo ``merge_lora`` (exact up to float rounding for full-precision bases)."""
    for _, layer in lora_layers(model):
        layer.unmerge()


def unwrap_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRA layer by its base layer and every saved-module wrapper by its active copy.

    Call after ``merge_lora`` to get a plain transformers model; adapters not merged are dropped.
    """
    for name, layer in list(lora_layers(model)):
        _set_module(model, name, layer.base_layer)
    for name, wrapper in list(saved_modules(model)):
        _set_module(model, name, wrapper.current())
    if hasattr(model, "minift_lora_configs"):
        del model.minift_lora_configs
    return model
