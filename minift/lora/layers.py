"""Hand-written LoRA, rsLoRA and DoRA layers, injected into transformers models by module name.

A wrapped layer computes ``y = base(x) + scale * B(A(dropout(x)))`` for each enabled adapter,
with ``scale = lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` with rsLoRA). Bases may be
``nn.Linear``, GPT-2's ``Conv1D`` (weight stored ``[in, out]``) or bitsandbytes 4/8-bit linears
(QLoRA). Several named adapters can live on one model: e.g. a frozen adapter from an earlier
stage plus a trainable one, which is how stages chain on quantized bases where merging is lossy.
In-memory parameter names follow peft (``q_proj.lora_A.<adapter>.weight``), so the PEFT file
format is a rename away (see ``minift/lora/adapters.py``). ``LoraConfig`` and the name-matching rules live
in ``minift/lora_config.py``; ``from minift.lora import LoraConfig`` works as before.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from minift.constants import DEFAULT_ADAPTER
from minift.lora.config import LoraConfig, name_matches
from minift.lora.weights import (
    base_kind,
    dequantized_weight,
    keep_4bit_layout_trainable,
    layer_features,
    set_base_weight,
)

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- layers


class LoraLayer(nn.Module):
    """A base layer plus any number of named low-rank adapters (LoRA, rsLoRA or DoRA)."""

    def __init__(self, base_layer: nn.Module, kind: str):
        super().__init__()
        self.base_layer = base_layer
        self.kind = kind
        self.in_features, self.out_features = layer_features(base_layer, kind)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.merged: list[str] = []  # adapters currently folded into the base weight, in order
        self._dora_norms: dict[str, torch.Tensor] = {}  # row norms used at merge time (to unmerge)
        self.disabled: set[str] = set()
        self.train(base_layer.training)  # new sub-modules follow the model's train/eval mode

    @property
    def weight(self) -> torch.Tensor:  # some model code reads `.weight` of its projections
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def add_adapter(
        self, name: str, r: int, alpha: float, dropout: float, use_rslora: bool, use_dora: bool, init: bool | str
    ) -> None:
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        weight = self.base_layer.weight
        device = weight.device
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32
        a = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        b = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(a.weight, std=1.0 / r)
            else:
                nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
            if init is False:  # non-zero B: only useful for tests that need a visible adapter
                nn.init.kaiming_uniform_(b.weight, a=math.sqrt(5))
            else:
                nn.init.zeros_(b.weight)
        self.lora_A[name], self.lora_B[name] = a, b
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_dropout[name].train(self.training)
        self.r[name], self.lora_alpha[name] = r, alpha
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r
        if use_dora:
            with torch.no_grad():
                w = dequantized_weight(self.base_layer, self.kind).float()
                norm = (w + self.delta_weight(name).float()).norm(dim=1)
            self.lora_magnitude_vector[name] = nn.Parameter(norm.to(device=device, dtype=dtype))

    def delta_weight(self, name: str) -> torch.Tensor:
        """``scale * B @ A`` in ``[out, in]`` orientation (before any DoRA rescaling)."""
        return self.scaling[name] * (self.lora_B[name].weight @ self.lora_A[name].weight)

    def active(self) -> list[str]:
        return [n for n in self.lora_A if n not in self.disabled and n not in self.merged]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        names = self.active()
        if not names:
            return result
        out_dtype = result.dtype
        for name in names:
            a, b = self.lora_A[name], self.lora_B[name]
            xa = self.lora_dropout[name](x.to(a.weight.dtype))
            if name in self.lora_magnitude_vector:
                result = result + self._dora_delta(name, xa, result).to(out_dtype)
                continue
            # One GEMM adds B's product, scaled, into the result: two fewer passes over the [tokens, out]
            # output than `result + B(A(x)) * scale`, and no pass for the scale.
            h = a(xa)
            if torch.is_autocast_enabled(h.device.type) or h.dtype == out_dtype:
                flat = torch.addmm(result.reshape(-1, self.out_features), h.reshape(-1, h.shape[-1]), b.weight.t(),
                                   alpha=self.scaling[name])
                result = flat.view(result.shape)
            else:
                result = result + b(h * self.scaling[name]).to(out_dtype)
        return result

    def _dora_delta(self, name: str, xa: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        # DoRA (Liu et al. 2024): W' = m * (W + sBA) / ||W + sBA||_row, the norm detached in backward.
        # W' x = (m/n) W x + (m/n) s B A x, so only the correction (m/n - 1) W x is added to base(x).
        a, b, scale = self.lora_A[name], self.lora_B[name], self.scaling[name]
        w = dequantized_weight(self.base_layer, self.kind).to(a.weight.dtype)
        norm = (w + self.delta_weight(name).to(w.dtype)).norm(dim=1).detach()
        mag = self.lora_magnitude_vector[name] / norm
        if isinstance(self.lora_dropout[name], nn.Identity):
            wx = base_out.to(a.weight.dtype)
            if self.bias is not None:
                wx = wx - self.bias.to(wx.dtype)
        else:  # the base term must see the same dropped-out input as the adapter
            wx = F.linear(xa, w)
        return (mag - 1) * wx + mag * b(a(xa)) * scale

    # -- merging

    def _merged_weight_for(self, name: str, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``w`` with adapter ``name`` folded in, and DoRA's row norms of ``w + sBA`` (None for plain LoRA)."""
        merged = w + self.delta_weight(name).to(w.dtype)
        if name not in self.lora_magnitude_vector:
            return merged, None
        norm = merged.norm(dim=1, keepdim=True)
        return merged * (self.lora_magnitude_vector[name].to(w.dtype)[:, None] / norm), norm

    @torch.no_grad()
    def merge(self, names: list[str] | None = None) -> None:
        names = [n for n in (names or list(self.lora_A)) if n not in self.merged]
        if not names:
            return
        w = dequantized_weight(self.base_layer, self.kind).float()
        for name in names:
            w, norm = self._merged_weight_for(name, w)
            if norm is not None:
                self._dora_norms[name] = norm
            self.merged.append(name)
        set_base_weight(self.base_layer, self.kind, w)

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        w = dequantized_weight(self.base_layer, self.kind).float()
        for name in reversed(self.merged):
            if name in self.lora_magnitude_vector:
                w = w * (self._dora_norms.pop(name) / self.lora_magnitude_vector[name].float()[:, None])
            w = w - self.delta_weight(name).float()
        self.merged = []
        set_base_weight(self.base_layer, self.kind, w)


class ModulesToSave(nn.Module):
    """Keeps the original module frozen and trains a full copy per adapter (peft's ``modules_to_save``)."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.disabled: set[str] = set()

    def add_adapter(self, name: str) -> None:
        # Start from the module as the model currently computes it, so chained stages build on each other.
        self.modules_to_save[name] = copy.deepcopy(self.current())

    def current(self) -> nn.Module:
        for name in reversed(list(self.modules_to_save)):
            if name not in self.disabled:
                return self.modules_to_save[name]
        return self.original_module

    def forward(self, *args, **kwargs):
        return self.current()(*args, **kwargs)

    @property
    def weight(self) -> torch.Tensor:
        return self.current().weight


# ----------------------------------------------------------------------------- model level


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """(module path, layer) for every LoRA-wrapped layer, paths as in the unwrapped model."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def saved_modules(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSave):
            yield name, module


def adapter_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """The configs of the adapters on ``model``, by adapter name, in the order they were added."""
    return getattr(model, "minift_lora_configs", {})


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Paths of the modules ``config`` selects, before any wrapping. Raises if nothing matches."""
    output_head = None
    if hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None:
        head = model.get_output_embeddings()
        output_head = next((n for n, m in model.named_modules() if m is head), None)
    saved = config.modules_to_save or []
    candidates, found, wrappers = [], [], []
    for name, module in model.named_modules():
        if any(name.startswith(w + ".") for w in wrappers):
            continue  # LoRA's own A/B layers and saved copies are never targets
        if isinstance(module, (LoraLayer, ModulesToSave)):
            wrappers.append(name)
        if isinstance(module, ModulesToSave):
            continue
        base = module.base_layer if isinstance(module, LoraLayer) else module
        if base_kind(base) is None:
            continue
        candidates.append(name)
        if config.exclude_modules and name_matches(config.exclude_modules, name):
            continue
        if any(name == m or name.endswith("." + m) for m in saved):
            continue
        if config.target_modules == "all-linear":
            if name != output_head:
                found.append(name)
        elif name_matches(config.target_modules, name):
            found.append(name)
    if not found:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in candidates})
        raise ValueError(
            f"target_modules={config.target_modules!r} matched no linear layer in {type(model).__name__}. "
            f"Linear layer names in this model: {', '.join(leaves)} "
            f"(e.g. {candidates[0] if candidates else 'none'}). Use one of these, a regex, or 'all-linear'."
        )
    return found


def check_ranks(model: nn.Module, config: LoraConfig) -> None:
    """Refuse a rank above a target layer's smaller dimension: a layer's update has rank at most that, so the
    extra rank adds parameters and no capacity (a typo, or a config meant for a bigger model)."""
    for name in find_targets(model, config):
        module = model.get_submodule(name)
        module = module.base_layer if isinstance(module, LoraLayer) else module
        n_in, n_out = layer_features(module, base_kind(module))
        if config.rank_for(name) > min(n_in, n_out):
            raise ValueError(f"LoRA rank {config.rank_for(name)} is larger than {name}'s dimensions ({n_in} in, "
                             f"{n_out} out), so it adds parameters but no capacity; use --lora_r "
                             f"{min(n_in, n_out)} or less (or a rank_pattern entry for such layers)")


def apply_lora(
    model: nn.Module, config: LoraConfig, adapter_name: str = DEFAULT_ADAPTER, trainable: bool = True
) -> nn.Module:
    """Inject adapter ``adapter_name`` into ``model`` in place and freeze everything else.

    Calling it again with another name adds a second adapter to the same layers (the earlier
    ones stay, frozen unless ``trainable`` was set for them again with ``set_trainable``).
    Returns ``model``.
    """
    configs = dict(adapter_configs(model))
    if adapter_name in configs:
        raise ValueError(f"the model already has an adapter named {adapter_name!r}")
    targets = find_targets(model, config)
    for module in model.modules():
        if base_kind(module) == "bnb4":
            keep_4bit_layout_trainable(module)
    for name in targets:
        module = model.get_submodule(name)
        if not isinstance(module, LoraLayer):
            module = LoraLayer(module, base_kind(module))
            _set_module(model, name, module)
        module.add_adapter(
            adapter_name,
            r=config.rank_for(name),
            alpha=config.alpha_for(name),
            dropout=config.lora_dropout,
            use_rslora=config.use_rslora,
            use_dora=config.use_dora,
            init=config.init_lora_weights,
        )
    for target in config.modules_to_save or []:
        matches = [n for n, m in model.named_modules() if (n == target or n.endswith("." + target))]
        matches = [n for n in matches if ".modules_to_save." not in n and ".original_module" not in n]
        if not matches:
            raise ValueError(f"modules_to_save entry {target!r} matches no module in {type(model).__name__}")
        for name in matches:
            module = model.get_submodule(name)
            if not isinstance(module, ModulesToSave):
                module = ModulesToSave(module)
                _set_module(model, name, module)
            module.add_adapter(adapter_name)
    configs[adapter_name] = config
    model.minift_lora_configs = configs
    set_trainable(model, [adapter_name] if trainable else [])
    return model


def set_trainable(model: nn.Module, adapter_names: list[str]) -> None:
    """Make exactly the named adapters' parameters trainable; freeze every other parameter."""
    model.requires_grad_(False)
    for name in adapter_names:
        if name not in adapter_configs(model):
            raise ValueError(f"no adapter named {name!r}; the model has {list(adapter_configs(model))}")
        for _, layer in lora_layers(model):
            if name in layer.lora_A:
                layer.lora_A[name].requires_grad_(True)
                layer.lora_B[name].requires_grad_(True)
                if name in layer.lora_magnitude_vector:
                    layer.lora_magnitude_vector[name].requires_grad_(True)
        for _, wrapper in saved_modules(model):
            if name in wrapper.modules_to_save:
                wrapper.modules_to_save[name].requires_grad_(True)
    if adapter_names:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        logger.info("trainable params: %s / %s (%.4f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)


def remove_adapter(model: nn.Module, name: str) -> None:
    """Delete adapter ``name`` from every layer (layers left with no adapter keep their wrapper, which then
    computes the base alone). Unmerge first if it is merged."""
    if name not in adapter_configs(model):
        raise ValueError(f"no adapter named {name!r}; the model has {list(adapter_configs(model))}")
    for _, layer in lora_layers(model):
        if name in layer.merged:
            raise RuntimeError(f"adapter {name!r} is merged into the base weights: unmerge first")
        for parts in (layer.lora_A, layer.lora_B, layer.lora_dropout, layer.lora_magnitude_vector):
            if name in parts:
                del parts[name]
        for table in (layer.r, layer.lora_alpha, layer.scaling):
            table.pop(name, None)
        layer.disabled.discard(name)
    for _, wrapper in saved_modules(model):
        if name in wrapper.modules_to_save:
            del wrapper.modules_to_save[name]
        wrapper.disabled.discard(name)
    del model.minift_lora_configs[name]


@contextlib.contextmanager
def disable_adapters(model: nn.Module, names: list[str] | None = None):
    """Run the model without the named adapters (all by default): the reference model for free."""
    names = list(adapter_configs(model)) if names is None else list(names)
    touched = []
    for _, module in list(lora_layers(model)) + list(saved_modules(model)):
        if isinstance(module, LoraLayer) and set(names) & set(module.merged):
            raise RuntimeError("cannot disable adapters that are merged into the base weights: unmerge first")
        added = set(names) - module.disabled
        module.disabled |= added
        touched.append((module, added))
    try:
        yield model
    finally:
        for module, added in touched:
            module.disabled -= added
