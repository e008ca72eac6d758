"""The reference implementations minift is checked against: peft and trl, test-only dependencies (``.[test]``).

Tests use them directly; the comparison sides of ``tools/bench.py`` (lora vs peft, sft vs trl's SFTTrainer,
dpo vs trl's DPOTrainer) load them through this module, so that ``minift/``, ``recipes/`` and ``tools/``
never import peft or trl themselves. Everything raises ImportError when the oracles are not installed.
"""

from __future__ import annotations


def available() -> bool:
    """Whether peft and trl can be imported."""
    try:
        import peft  # noqa: F401
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


def peft_lora_config(**kwargs):
    """``peft.LoraConfig(**kwargs)``."""
    from peft import LoraConfig

    return LoraConfig(**kwargs)


def peft_model(model, **lora_kwargs):
    """``peft.get_peft_model`` with a LoraConfig of ``lora_kwargs``."""
    from peft import get_peft_model

    return get_peft_model(model, peft_lora_config(**lora_kwargs))


def trl_sft():
    """trl's ``(SFTConfig, SFTTrainer)``."""
    from trl import SFTConfig, SFTTrainer

    return SFTConfig, SFTTrainer


def trl_dpo():
    """trl's ``(DPOConfig, DPOTrainer)``."""
    from trl import DPOConfig, DPOTrainer

    return DPOConfig, DPOTrainer


def trl_version() -> str:
    import trl

    return trl.__version__
