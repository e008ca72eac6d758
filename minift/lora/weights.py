"""Read and write the weight of a base layer whatever its storage: ``nn.Linear``, GPT-2 ``Conv1D``
(stored ``[in, out]``), bitsandbytes ``Linear4bit`` (NF4/FP4) and ``Linear8bitLt`` (LLM.int8).

Weights are always exchanged as float ``[out, in]`` tensors, so LoRA code never needs to know the storage.
"""

from __future__ import annotations

import sys

import torch
from torch import nn


def _bnb():
    """bitsandbytes if something already imported it, else None: a model can hold bnb layers only after the
    library was imported (transformers imports it to quantize on load), and importing it here for every
    model would cost its start-up and its warnings in runs that never quantize."""
    return sys.modules.get("bitsandbytes")


def base_kind(module: nn.Module) -> str | None:
    """'linear', 'conv1d', 'bnb4' or 'bnb8' for layers LoRA can wrap, else None."""
    bnb = _bnb()
    if bnb is not None:
        if isinstance(module, bnb.nn.Linear4bit):
            return "bnb4"
        if isinstance(module, bnb.nn.Linear8bitLt):
            return "bnb8"
    if isinstance(module, nn.Linear):
        return "linear"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return "conv1d"
    return None


def layer_features(module: nn.Module, kind: str) -> tuple[int, int]:
    if kind == "conv1d":
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def keep_4bit_layout_trainable(module: nn.Module) -> None:
    """Stop bitsandbytes from repacking a 4-bit weight for its CPU inference kernel (and undo it).

    On CPUs with AVX512-BF16, ``Linear4bit`` repacks its weight on the first no-grad eval forward.
    The packed kernel has no backward, so a later training step silently gets no gradient through
    the layer (every adapter before it stops learning), and the packed bytes no longer dequantize.
    """
    if hasattr(module, "support_avx512bf16_for_cpu"):
        module.support_avx512bf16_for_cpu = False
    w = module.weight
    if getattr(getattr(w, "quant_state", None), "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        w.data, w.quant_state = _convert_weight_packed_for_cpu_inverse(w.data, w.quant_state)


def dequantized_weight(module: nn.Module, kind: str) -> torch.Tensor:
    """The base weight as a float tensor in ``[out, in]`` orientation, whatever its storage."""
    w = module.weight
    if kind == "linear":
        return w.data
    if kind == "conv1d":
        return w.data.t()
    if kind == "bnb4":
        keep_4bit_layout_trainable(module)
        return _bnb().functional.dequantize_4bit(w.data, w.quant_state).float()
    if kind == "bnb8":
        # bitsandbytes moves the row scales from the weight to the layer state on first forward.
        scb = w.SCB if getattr(w, "SCB", None) is not None else module.state.SCB
        return w.data.float() * (scb.float()[:, None] / 127.0)
    raise ValueError(f"unknown base kind {kind!r}")


def set_base_weight(module: nn.Module, kind: str, weight: torch.Tensor) -> None:
    """Write ``weight`` (``[out, in]``) back into the base layer, re-quantizing bnb layers."""
    w = module.weight
    if kind == "linear":
        w.data.copy_(weight.to(w.dtype))
    elif kind == "conv1d":
        w.data.copy_(weight.t().to(w.dtype))
    elif kind == "bnb4":
        bnb = _bnb()
        device = w.data.device
        new = bnb.nn.Params4bit(
            weight.to("cpu", dtype=torch.float32).contiguous(),
            requires_grad=False,
            quant_type=w.quant_type,
            blocksize=w.blocksize,
            compress_statistics=w.compress_statistics,
            quant_storage=w.quant_storage,
        )
        module.weight = new._quantize(device)
    elif kind == "bnb8":
        bnb = _bnb()
        new = bnb.nn.Int8Params(weight.to("cpu", torch.float16).contiguous(), requires_grad=False, has_fp16_weights=False)
        module.weight = new.to(w.data.device)  # its forward moves the new CB/SCB into the layer state
    else:
        raise ValueError(f"unknown base kind {kind!r}")
