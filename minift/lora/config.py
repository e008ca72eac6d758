"""LoRA hyper-parameters (``LoraConfig``, peft's field names) and peft's rules for matching module names."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field


@dataclass
class LoraConfig:
    """LoRA hyper-parameters; field names and matching rules follow peft's ``LoraConfig``.

    ``target_modules``: ``"all-linear"`` (every linear layer except the output head), a regex
    string (full match against the module path), or a list of names, each matching a module whose
    path equals it or ends with ``"." + name``. ``exclude_modules`` uses the same rules.
    ``rank_pattern`` / ``alpha_pattern`` map a regex matched against the tail of a module path to
    a per-module rank / alpha. ``modules_to_save`` lists modules trained in full (a copy is
    trained, the original is kept for when adapters are disabled).
    """

    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"
    exclude_modules: list[str] | str | None = None
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | str = True  # True: kaiming A, zero B; "gaussian": N(0, 1/r) A, zero B
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] | None = None
    bias: str = "none"

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        if self.lora_alpha <= 0:
            raise ValueError(f"LoraConfig.lora_alpha must be positive, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(
                f"LoraConfig.init_lora_weights must be True, False or 'gaussian', got {self.init_lora_weights!r}"
            )
        if self.bias != "none":
            raise ValueError(f"only bias='none' is supported (biases stay frozen), got {self.bias!r}")
        for key, value in self.rank_pattern.items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"rank_pattern[{key!r}] must be a positive integer, got {value!r}")
        if isinstance(self.target_modules, (list, tuple)) and not self.target_modules:
            raise ValueError("LoraConfig.target_modules is empty: name at least one module or use 'all-linear'")

    def rank_for(self, module_name: str) -> int:
        key = _pattern_key(self.rank_pattern, module_name)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, module_name: str) -> float:
        key = _pattern_key(self.alpha_pattern, module_name)
        return self.alpha_pattern[key] if key is not None else self.lora_alpha

    def to_dict(self) -> dict:
        return asdict(self)


def _pattern_key(patterns: dict, module_name: str) -> str | None:
    # peft semantics: the pattern must match a dotted tail of the module path.
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


def name_matches(spec: list[str] | str, name: str) -> bool:
    """peft's target rule: a string is a regex matched against the whole path; a list entry matches a path
    equal to it or ending with ``"." + entry``."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)
