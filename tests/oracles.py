"""The reference implementations minift is checked against: peft and trl, test-only dependencies (``.[test]``).

Tests use them directly; the comparison sides of ``tools/bench.py`` (lora vs peft, sft vs trl's SFTTrainer,
dpo vs trl's DPOTrainer, grpo vs trl's GRPOTrainer) load them through this module, so that ``minift/``,
``recipes/`` and ``tools/`` never import peft or trl themselves. Everything raises ImportError when the
oracles are not installed.
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


def trl_grpo():
    """trl's ``(GRPOConfig, GRPOTrainer)``."""
    from trl import GRPOConfig, GRPOTrainer

    return GRPOConfig, GRPOTrainer


def trl_version() -> str:
    import trl

    return trl.__version__


def trl_grpo_loss(logps, old_logps, advantages, mask, *, ref_logps=None, beta=0.0, epsilon_low=0.2,
                  epsilon_high=None, importance_sampling="token", loss_type="dapo", max_completion_length=None,
                  num_items=None):
    """trl's ``GRPOTrainer._compute_loss`` on given per-token log-probs: the method runs unbound on a stand-in
    trainer whose model call returns ``logps`` (one process, no gradient accumulation, train mode)."""
    from collections import defaultdict
    from types import SimpleNamespace

    import torch
    from trl import GRPOTrainer

    stand_in = SimpleNamespace(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=importance_sampling,
        beta=beta, loss_type=loss_type, epsilon_low=epsilon_low,
        epsilon_high=epsilon_low if epsilon_high is None else epsilon_high, use_vllm=False,
        vllm_importance_sampling_correction=False, aux_loss_enabled=False, _entropy_bonus_enabled=False,
        current_gradient_accumulation_steps=1, max_completion_length=max_completion_length,
        model=SimpleNamespace(training=True), _metrics={"train": defaultdict(list)},
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        accelerator=SimpleNamespace(num_processes=1, reduce=lambda t, reduction: t, gather=lambda t: t),
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None))
    inputs = {"prompt_ids": torch.zeros(logps.shape[0], 1, dtype=torch.long),
              "prompt_mask": torch.ones(logps.shape[0], 1, dtype=torch.long),
              "completion_ids": torch.zeros(logps.shape, dtype=torch.long), "completion_mask": mask,
              "advantages": advantages, "old_per_token_logps": old_logps, "ref_per_token_logps": ref_logps,
              "num_items_in_batch": torch.as_tensor(mask.sum() if num_items is None else num_items, dtype=logps.dtype)}
    return GRPOTrainer._compute_loss(stand_in, None, inputs)


def trl_generalized_jsd(student_logits, teacher_logits, labels=None, *, beta=0.5, temperature=1.0):
    """trl's ``GKDTrainer.generalized_jsd_loss`` (``(B, T, V)`` logits, labels -100 ignored, mean over positions)."""
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDTrainer

    return GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, labels=labels, beta=beta,
                                           temperature=temperature)
