"""Adapters on the way to GGUF: merged into the weights while streaming, or written as a llama.cpp LoRA GGUF.

Merging follows ``merge_and_save`` exactly (same fp32 operations in the same order, so the same bits):
per adapter in order, ``W <- W + s * (B @ A)`` with ``s = alpha / r`` (rsLoRA: ``alpha / sqrt(r)``)
after ``rank_pattern`` / ``alpha_pattern``; DoRA then rescales rows, ``W <- m * W / ||W||_row``;
``modules_to_save`` replace the tensor. ``W`` is in ``[out, in]`` orientation (GPT-2 Conv1D weights
are transposed first).

A LoRA GGUF holds ``<name>.lora_a`` (``[r, in]``) and ``<name>.lora_b`` (``[out, r]``) and one
``adapter.lora.alpha``; llama.cpp scales every module by ``alpha / r`` with ``r`` read from the tensor.
Each module's true scale is folded into ``lora_b`` so that product is exact for rsLoRA, per-module
rank/alpha patterns and several adapters (stacked as ``[A_1; A_2]``, ``[s_1 B_1, s_2 B_2]``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from minift.export.gguf.arch import (
    ModelSpec,
    gguf_name,
    interleave_heads,
    transform_for,
)


@dataclass
class Merge:
    """One adapter's change to one weight: a LoRA delta (optionally DoRA) or a full replacement."""

    scale: float = 0.0  # torch tensors below (torch is imported only when adapters are used)
    a: object = None  # fp32 [r, in]
    b: object = None  # fp32 [out, r]
    magnitude: object = None  # DoRA, fp32 [out]
    full: object = None  # modules_to_save, fp32 in [out, in] orientation


def _read(adapter_dir: Path, spec: ModelSpec, model_dir: Path):
    """(LoRA parts per module, full tensors per module, LoraConfig) of an adapter, checked against the base."""
    # minift.lora.adapters' own parsing (torch-based, so imported only when adapters are used): an adapter
    # reads the same here as in load_adapter / merge_and_save.
    from minift.lora.adapters import (
        WEIGHTS_NAME,
        _lora_config_from_json,
        _split_keys,
        base_fingerprint,
        read_adapter,
    )

    config, tensors = read_adapter(adapter_dir)
    recorded = (config.get("minift") or {}).get("base_fingerprint")
    if recorded:
        from transformers import AutoConfig

        ours = base_fingerprint(AutoConfig.from_pretrained(model_dir))
        if recorded != ours:
            raise ValueError(f"{adapter_dir} was trained on a different base model "
                             f"({config.get('base_model_name_or_path')}, fingerprint {recorded}) than {model_dir} "
                             f"(fingerprint {ours}); convert it with the base it was trained on")
    lora, full = _split_keys(config, tensors, adapter_dir / WEIGHTS_NAME)
    return lora, full, _lora_config_from_json(config, sorted(lora))


def _source_key(source, spec: ModelSpec, module: str, param: str, adapter_dir: Path, model_dir: Path) -> str:
    """The checkpoint key of ``module.param`` (PEFT paths always carry the ``model.``/``transformer.`` prefix)."""
    bare = module.split(".", 1)[1] if module.startswith(("model.", "transformer.")) else module
    candidates = [f"{module}.{param}", f"{bare}.{param}"]
    if spec.tied and bare == "lm_head":  # tied: the output head is the embedding (even if lm_head.weight is saved)
        candidates = [k for k in source.tensors if k.endswith(("embed_tokens.weight", "wte.weight"))]
    key = next((k for k in candidates if k in source.tensors), None)
    if key is None:
        raise ValueError(f"{adapter_dir}: the adapter changes {module}, which {model_dir} does not have; the adapter "
                         f"was made for a different base model")
    return key


def _is_conv1d(spec: ModelSpec, key: str) -> bool:
    """Whether checkpoint tensor ``key`` is stored ``[in, out]`` (GPT-2's Conv1D)."""
    return transform_for(spec, gguf_name(spec, key)).transpose


def _linear_shape(source, spec: ModelSpec, key: str) -> tuple[int, ...]:
    shape = source.tensors[key].shape
    return (shape[1], shape[0]) if _is_conv1d(spec, key) else shape


def _check_shapes(where: Path, module: str, parts: dict, shape: tuple[int, ...], rank: int) -> None:
    a, b = parts["A"], parts["B"]
    if a.shape[0] != rank or b.shape[1] != rank:
        raise ValueError(f"{where}: {module} has lora_A {list(a.shape)} and lora_B {list(b.shape)} but the config "
                         f"gives rank {rank}; the config and the weights do not belong together")
    if (b.shape[0], a.shape[1]) != tuple(shape):
        raise ValueError(f"{where}: {module} maps {a.shape[1]} -> {b.shape[0]} features but the base weight is "
                         f"{list(shape)} ([out, in]); the adapter was trained on a different base model")


def plan_merges(adapter_dirs: list, source, spec: ModelSpec, model_dir: Path) -> dict[str, list[Merge]]:
    """Checkpoint key -> the merges to apply to it, in adapter order. Checks everything before any writing."""
    import torch

    merges: dict[str, list[Merge]] = {}
    for adapter_dir in map(Path, adapter_dirs):
        lora, full, cfg = _read(adapter_dir, spec, model_dir)
        for module, parts in lora.items():
            key = _source_key(source, spec, module, "weight", adapter_dir, model_dir)
            r = cfg.rank_for(module)
            _check_shapes(adapter_dir, module, parts, _linear_shape(source, spec, key), r)
            alpha = cfg.alpha_for(module)
            merges.setdefault(key, []).append(Merge(
                scale=alpha / math.sqrt(r) if cfg.use_rslora else alpha / r,
                a=parts["A"].to(torch.float32), b=parts["B"].to(torch.float32),
                magnitude=parts["m"].to(torch.float32) if "m" in parts else None))
        for owner, params in full.items():
            for param, value in params.items():
                key = _source_key(source, spec, owner, param, adapter_dir, model_dir)
                value = value.to(torch.float32)
                if _is_conv1d(spec, key):  # merges work on [out, in]; the checkpoint stores Conv1D [in, out]
                    value = value.t()
                merges.setdefault(key, []).append(Merge(full=value.contiguous()))
    return merges


def apply_merges(x: np.ndarray, merges: list[Merge]) -> np.ndarray:
    """The weight ``x`` (``[out, in]`` float32) with ``merges`` applied in order, as ``merge_lora`` does."""
    import torch

    w = torch.tensor(x, dtype=torch.float32)  # a copy: x may be a read-only view of the checkpoint
    for m in merges:
        if m.full is not None:
            w = m.full.reshape(w.shape).clone()
            continue
        w = w + m.scale * (m.b @ m.a)
        if m.magnitude is not None:
            w = w * (m.magnitude[:, None] / w.norm(dim=1, keepdim=True))
    return w.numpy()


def lora_gguf_tensors(adapter_dirs: list, source, spec: ModelSpec,
                      model_dir: Path) -> tuple[float, list[tuple[str, np.ndarray]]]:
    """(alpha, [(GGUF name, float32 array)]) of a llama.cpp LoRA adapter made from ``adapter_dirs``.

    Each module's tensors are ``lora_a = [A_1; A_2; ...]`` and ``lora_b = [s_1 B_1, s_2 B_2, ...] * R / alpha``
    with ``R`` the stacked rank, so llama.cpp's ``alpha / R`` scale gives back ``sum_i s_i B_i A_i``.
    """
    pairs: dict[str, list[tuple[np.ndarray, np.ndarray, Fraction | float]]] = {}
    alpha_out = None
    for adapter_dir in map(Path, adapter_dirs):
        lora, full, cfg = _read(adapter_dir, spec, model_dir)
        if cfg.use_dora or full:
            kind = "a DoRA adapter" if cfg.use_dora else f"an adapter with modules_to_save ({', '.join(full)})"
            raise ValueError(f"{adapter_dir} is {kind}, which llama.cpp's LoRA format cannot express; merge it into "
                             f"the model instead (convert_to_gguf.py MODEL --adapter {adapter_dir}, without --lora-only)")
        alpha_out = alpha_out if alpha_out is not None else float(cfg.lora_alpha)
        for module, parts in lora.items():
            key = _source_key(source, spec, module, "weight", adapter_dir, model_dir)
            if spec.tied and not module.endswith(("embed_tokens", "wte")) and key.endswith(("embed_tokens.weight",
                                                                                            "wte.weight")):
                raise ValueError(f"{adapter_dir}: LoRA on {module} of a model with tied embeddings has no tensor to "
                                 f"attach to in llama.cpp; merge the adapter instead (without --lora-only)")
            r = cfg.rank_for(module)
            _check_shapes(adapter_dir, module, parts, _linear_shape(source, spec, key), r)
            # Exact rational scale where there is no square root, so a plain adapter's factor is exactly 1.
            alpha = Fraction(cfg.alpha_for(module))
            scale = float(alpha) / math.sqrt(r) if cfg.use_rslora else alpha / r
            pairs.setdefault(key, []).append((parts["A"].float().numpy(), parts["B"].float().numpy(), scale))
    tensors = []
    for key, items in pairs.items():
        rank = sum(a.shape[0] for a, _, _ in items)
        factors = [s * rank / (Fraction(alpha_out) if isinstance(s, Fraction) else alpha_out) for _, _, s in items]
        lora_a = np.concatenate([a for a, _, _ in items], axis=0)
        lora_b = np.concatenate([b if f == 1 else (b * float(f)).astype(np.float32)  # one rounding, in float64
                                 for (_, b, _), f in zip(items, factors)], axis=1)
        name = gguf_name(spec, key)
        heads = transform_for(spec, name).interleave_heads
        if heads:  # lora_b's rows are the weight's output rows; lora_a's columns are untouched inputs
            lora_b = interleave_heads(lora_b, heads)
        tensors += [(f"{name}.lora_a", lora_a), (f"{name}.lora_b", np.ascontiguousarray(lora_b))]
    return alpha_out, tensors
