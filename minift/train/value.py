"""A PPO value function on the policy's own base model, never a second copy of it: a second trainable LoRA adapter
plus a scalar head, or a head on the policy's final hidden states; and :class:`PolicyValue`, the one module that
returns both the policy's token log-probs and the values."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from minift.constants import DEFAULT_ADAPTER, IGNORE_INDEX
from minift.lora.config import LoraConfig
from minift.lora.layers import apply_lora, disable_adapters, set_trainable
from minift.train.checkpoints import Weights
from minift.train.forward import TokenLogprobs
from minift.train.zero import uses_deepspeed

VALUE_ADAPTER = "value"


class PolicyValue(nn.Module):
    """One forward for a PPO update: the policy's per-token log-probs and the values ``(B, T - 1)``, both laid out as
    :class:`~minift.train.forward.TokenLogprobs` lays them out (position t: token t + 1; the value of the state
    after token t), 0 where the labels are ignored. ``value_adapter`` None: the value head reads the policy's own
    final hidden states (one pass); else the value pass runs the base with that adapter instead of the policy's."""

    def __init__(self, model: nn.Module, value_adapter: str | None):
        super().__init__()
        self.logps, self.value_adapter = TokenLogprobs(model), value_adapter
        self.model = model

    def _off(self, names: list[str]):
        return disable_adapters(self.model, names) if names else contextlib.nullcontext()

    def policy_only(self):
        """The model as the policy alone (the value adapter off): for sampling and greedy evaluation."""
        return self._off([self.value_adapter] if self.value_adapter else [])

    def adapters_of(self, part: str):
        """The adapters of one pass: "policy" the value adapter off, "value" (with a value adapter) the policy's off.
        A pass's backward must run inside it too, where gradient checkpointing recomputes the pass's layers."""
        return self._off([DEFAULT_ADAPTER]) if part == "value" and self.value_adapter else self.policy_only()

    def forward(self, input_ids, attention_mask, labels, part: str = "both"):
        """``(logps, values)``; with a value adapter, ``part`` "policy" or "value" runs that pass alone and returns its
        tensor, so that a backward after each pass frees its activations before the next pass stores its own."""
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        labelled = labels[:, 1:] != IGNORE_INDEX
        zeros = torch.zeros(labelled.shape, dtype=torch.float32, device=input_ids.device)
        if part != "value" or not self.value_adapter:
            with self.adapters_of("policy"):
                hidden, targets = self.logps.labelled_hidden(batch)
                logps = zeros.masked_scatter(labelled, self.logps.labelled_logps(batch, (hidden, targets)))
            if part == "policy":
                return logps
        if self.value_adapter:
            with self.adapters_of("value"):
                hidden, _ = self.logps.labelled_hidden(batch)
        head = self.model.value_head
        values = zeros.masked_scatter(labelled, head(hidden.to(head.weight.dtype)).squeeze(-1).float())
        return values if part == "value" else (logps, values)

    @torch.no_grad()
    def reference(self, input_ids, attention_mask, labels) -> torch.Tensor:
        """The start model's per-token log-probs: every trainable adapter off."""
        with disable_adapters(self.model, [DEFAULT_ADAPTER] + ([self.value_adapter] if self.value_adapter else [])):
            return self.logps(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def add_value_function(model: nn.Module, weights: Weights, value_lora: LoraConfig | None) -> PolicyValue:
    """Give ``model`` (the policy, adapter :data:`DEFAULT_ADAPTER`) a value function: with ``value_lora``, a second
    trainable adapter (:data:`VALUE_ADAPTER`) on the same base as its trunk, else the policy's own states; and a
    zero-initialized float32 head ``model.value_head``. Both are registered in ``weights``, so checkpoints save and
    restore them."""
    if value_lora is not None:
        apply_lora(model, value_lora, adapter_name=VALUE_ADAPTER)
        set_trainable(model, [DEFAULT_ADAPTER, VALUE_ADAPTER])
        weights.extra_adapters.append(VALUE_ADAPTER)
    model.value_head = nn.Linear(model.config.get_text_config().hidden_size, 1, dtype=torch.float32)
    nn.init.zeros_(model.value_head.weight), nn.init.zeros_(model.value_head.bias)
    weights.extra_modules["value_head"] = model.value_head
    return PolicyValue(model, VALUE_ADAPTER if value_lora is not None else None)


def average_gradients(accelerator, module: nn.Module) -> None:
    """Average the gradients of ``module``'s trainable parameters over the processes, in one all-reduce: for a step
    whose backward passes all ran under ``accelerator.no_sync`` because each pass leaves some parameters unused
    (DDP's own reduction leaves a parameter that no process used in the synced pass untouched)."""
    if accelerator.num_processes == 1 or uses_deepspeed(accelerator):  # DeepSpeed reduces every gradient at its step
        return
    grads = [p.grad for p in module.parameters() if p.requires_grad and p.grad is not None]
    flat = accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), "mean")
    for grad, averaged in zip(grads, flat.split([g.numel() for g in grads])):
        grad.copy_(averaged.view_as(grad))
