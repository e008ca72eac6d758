"""PPO with a learned value function: online RL from reward functions or a reward model, with LoRA, on the stage kit.

    accelerate launch recipes/sft.py --num_train_epochs 5 --output_dir out/sft_weak        # a weak start (44%)
    accelerate launch recipes/ppo.py --init_adapter out/sft_weak/adapter                   # exact-match reward
    accelerate launch recipes/reward_model.py                                              # a reward model, then
    accelerate launch recipes/ppo.py --init_adapter out/sft_weak/adapter --reward out/reward_model/merged

Each rollout batch: one completion per prompt from the current policy (the library's sampling engine, seeded per
prompt, so any number of processes draws the same), scored by the rewards; a completion cut at
``max_completion_length`` loses ``missing_eos_penalty``. The start model (the trainable adapters disabled: no
second copy) gives the per-token KL penalty ``−β (log π − log π_ref)``, the score is added at the last token, and
the value function estimates each state's return: a second trainable adapter on the same base plus a scalar head
(``--value_model adapter``), or a head on the policy's own hidden states (``--value_model shared``). GAE by reverse
scan turns rewards and values into advantages, whitened over the batch of every process. Then ``ppo_epochs``
passes over the batch in ``num_minibatches`` minibatches, each an optimizer step of the clipped policy loss plus
``vf_coef`` x the clipped value loss. β is fixed, or adapted towards ``target_kl`` (Ziegler et al. 2019).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minift.config import require
from minift.constants import IGNORE_INDEX
from minift.losses import (
    AdaptiveKLController,
    gae_advantages,
    kl_penalized_rewards,
    masked_moments,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
)
from minift.sections import DataSection, RolloutSection, TrainConfig
from minift.train.forward import evaluation_mode, total_tokens
from minift.train.remote import tis_weights
from minift.train.rewards import Rewards
from minift.train.rollouts import Rollouts, online_inputs, rollout_params
from minift.train.setup import lora_config_from
from minift.train.stage import Stage, run_recipe
from minift.train.value import PolicyValue, add_value_function, average_gradients

DATA = Path(__file__).resolve().parent / "data"


@dataclass
class PPOConfig(RolloutSection, DataSection, TrainConfig):
    value_model: str = field(default="adapter", metadata={"help": "adapter (a second adapter + a value head) or "
                                                                  "shared (a value head on the policy's states)"})
    init_kl_coef: float = field(default=0.01, metadata={"help": "KL penalty coefficient (beta) at the start"})
    target_kl: float | None = field(default=None, metadata={"help": "adapt beta towards this KL per completion "
                                                                    "(none: beta stays fixed)"})
    kl_horizon: int = field(default=10000, metadata={"help": "adaptive KL: completions over which beta adapts"})
    gamma: float = field(default=1.0, metadata={"help": "discount"})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda"})
    cliprange: float = field(default=0.2, metadata={"help": "policy ratio clip range"})
    cliprange_value: float = field(default=0.2, metadata={"help": "value clip range around the rollout's values"})
    vf_coef: float = field(default=0.1, metadata={"help": "weight of the value loss"})
    whiten_advantages: bool = field(default=True, metadata={"help": "advantages to mean 0, std 1 over the batch"})
    missing_eos_penalty: float = field(default=0.0, metadata={"help": "subtracted from the score of a completion "
                                                                      "cut at max_completion_length"})
    ppo_epochs: int = field(default=2, metadata={"help": "passes over each rollout batch"})
    num_minibatches: int = field(default=1, metadata={"help": "optimizer steps per pass (the batch split)"})
    DEMO_DATA, DEMO_EVAL = DATA / "demo_prompts.jsonl", DATA / "demo_eval.jsonl"
    RECORDS = "prompt"
    dataset_name_or_path: str = str(DEMO_DATA)
    output_dir: str = "out/ppo"
    # The demo: from the weak SFT start (45% held-out exact match), 64 prompts a rollout batch, two PPO epochs over
    # each, exact-match reward: 62% after 24 passes over the 4,000 demo prompts (66% in a one-thread run). In sweeps:
    # one PPO epoch 52-56% (16 passes; KL coefficient .05 or .01, lr 1e-3 to 3e-3), four 59%, two over 16 passes 62%.
    per_device_train_batch_size: int = 64
    learning_rate: float = 2e-3
    num_train_epochs: float = 24.0
    lora_r: int = 16
    REAL_MODEL = {**TrainConfig.REAL_MODEL, "learning_rate": 1e-5, "num_train_epochs": 1.0,
                  "per_device_train_batch_size": 16, "max_completion_length": 256}

    def check(self) -> None:
        checks = [(self.value_model in ("adapter", "shared"), f"value_model must be adapter or shared, got "
                                                              f"{self.value_model!r}"),
                  (self.lora_r > 0, "PPO keeps the start model as its reference, which a full fine-tune (lora_r 0) "
                                    "does not: train an adapter"),
                  (self.init_kl_coef >= 0 and (self.target_kl is None or self.target_kl > 0) and self.kl_horizon > 0,
                   "init_kl_coef must be >= 0, target_kl > 0 (or none) and kl_horizon > 0"),
                  (0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "gamma and lam must be in [0, 1]"),
                  (self.cliprange > 0 and self.cliprange_value > 0 and self.vf_coef >= 0,
                   "cliprange and cliprange_value must be > 0, vf_coef >= 0"),
                  (self.ppo_epochs >= 1 and self.num_minibatches >= 1, "ppo_epochs and num_minibatches must be >= 1"),
                  (self.per_device_train_batch_size % self.num_minibatches == 0,
                   f"per_device_train_batch_size ({self.per_device_train_batch_size}) must divide into "
                   f"num_minibatches ({self.num_minibatches})"),
                  self.saves_between_rollouts(self.updates, "ppo_epochs x num_minibatches")]
        require(checks)

    @property
    def updates(self) -> int:
        """Optimizer steps per rollout batch."""
        return self.ppo_epochs * self.num_minibatches

    def batch_plan(self) -> tuple[int, int]:
        return self.per_device_train_batch_size, self.updates  # one prompt, one completion: a rollout serves `updates`


class PPOBatches:
    """``make(prompts, seeds, refill)``: a rollout micro-batch ready for its updates: completions, the rollout
    policy's log-probs and values, the KL-penalized rewards, advantages and returns; its metrics as one tensor
    (``names`` label it). Whitening and the KL controller see the micro-batch of every process (``reduce``)."""

    def __init__(self, cfg: PPOConfig, model: PolicyValue, tokenizer, rewards: Rewards, kl: AdaptiveKLController,
                 reduce):
        self.rollouts = Rollouts(model.model, tokenizer, rewards, rollout_params(cfg), 1)
        self.cfg, self.model, self.kl, self.reduce, self.names = cfg, model, kl, reduce, []

    @torch.no_grad()
    def __call__(self, prompts: list[dict], seeds: list[int], refill=None) -> dict:
        cfg = self.cfg
        with self.model.policy_only():
            batch, metrics = self.rollouts(prompts, seeds)
        sampled = batch.pop("sampler_logps")
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
        mask = batch["labels"][:, 1:] != IGNORE_INDEX
        with evaluation_mode(self.model):
            logps, values = self.model(**inputs)
            ref = self.model.reference(**inputs)
        scores = batch.pop("rewards") - cfg.missing_eos_penalty * batch["truncated"].double()
        rewards, kl = kl_penalized_rewards(scores.float(), logps, ref, mask, self.kl.value)
        advantages, returns = gae_advantages(rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam)
        if cfg.whiten_advantages:
            advantages = masked_whiten(advantages, mask, moments=self.reduce(masked_moments(advantages, mask)))
        batch.update(old_logps=logps, old_values=values, advantages=advantages, returns=returns)
        if self.rollouts.server is not None:  # another engine sampled: weight each token by trainer / sampler
            batch["tis_weights"], tis = tis_weights(logps, sampled, mask, cfg.tis_cap)
            metrics.update({k: v.item() for k, v in tis.items()})
        # the controller moves once per micro-batch, with the mean KL of the completions of every process
        kl_sum, rows = self.reduce(torch.stack([kl.sum().double(), torch.tensor(float(len(kl)), dtype=torch.float64)]))
        metrics.update(kl=(kl_sum / rows).item(), kl_coef=self.kl.value, score=scores.mean().item(),
                       non_score_reward=(rewards.sum() - scores.sum()).item() / len(scores))
        self.kl.update((kl_sum / rows).item(), int(rows))
        self.names = self.rollouts.packed(batch, metrics)
        return batch


def minibatch_rows(cfg: PPOConfig, step: int, rows: int) -> torch.Tensor:
    """The rows of this process's micro-batch that optimizer step ``step`` (1-based) trains: the batch is shuffled
    once per PPO epoch (seeded by the run's seed, the rollout batch and the epoch) and cut into minibatches."""
    update = (step - 1) % cfg.updates
    epoch, part = divmod(update, cfg.num_minibatches)
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(cfg.seed * 7919 + (step - 1) // cfg.updates
                                                                         * 101 + epoch))
    size = rows // cfg.num_minibatches
    return order[part * size: (part + 1) * size]


def ppo_step(accelerator, wrapper, policy_value: PolicyValue, cfg: PPOConfig, window: list[dict], step: int,
             names: list[str]) -> dict:
    """The clipped policy and value losses over this step's minibatch of each micro-batch, normalized by the
    completion tokens of all of them on every process. With a value adapter the policy and value passes each get
    their own backward (only one pass's activations alive at a time; each inside its pass's adapters, where
    gradient checkpointing recomputes it) under ``no_sync``, and the step's gradients are averaged over processes
    once at the end (DDP's own reduction skips parameters a pass leaves unused)."""
    record = Rollouts.window_means(accelerator, window, names)
    parts = [{k: v[minibatch_rows(cfg, step, len(batch["input_ids"]))] for k, v in batch.items()} for batch in window]
    masks = [b["labels"][:, 1:] != IGNORE_INDEX for b in parts]
    tokens = total_tokens(accelerator, (m.sum() for m in masks))
    stats = torch.zeros(7, dtype=torch.float64, device=accelerator.device)
    two_passes = cfg.value_model == "adapter"
    for i, (batch, mask) in enumerate(zip(parts, masks)):
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
        share = mask.sum() / tokens  # this micro-batch's share of the step's tokens (all processes)
        scale = share * accelerator.num_processes
        with accelerator.no_sync(wrapper) if two_passes or i < len(parts) - 1 else contextlib.nullcontext():
            with policy_value.adapters_of("policy"):
                logps, values = (wrapper(**inputs, part="policy"), None) if two_passes else wrapper(**inputs)
                policy_loss, policy_stats = ppo_policy_loss(logps, batch["old_logps"], batch["advantages"], mask,
                                                            clip_range=cfg.cliprange, weights=batch.get("tis_weights"))
                if two_passes:  # the policy pass's activations are freed before the value pass stores its own
                    accelerator.backward(policy_loss * scale)
            with policy_value.adapters_of("value"):
                values = wrapper(**inputs, part="value") if two_passes else values
                value_loss, value_stats = ppo_value_loss(values, batch["old_values"], batch["returns"], mask,
                                                         clip_range=cfg.cliprange_value)
                accelerator.backward((cfg.vf_coef * value_loss + (0 if two_passes else policy_loss)) * scale)
        loss = (policy_loss.detach() + cfg.vf_coef * value_loss.detach()) * share
        weights = torch.stack([policy_loss.detach(), value_loss.detach(), policy_stats["clip_frac"],
                               policy_stats["approx_kl"], value_stats["value_clip_frac"],
                               value_stats["explained_variance"]]).double() * share
        stats += torch.cat([weights, loss.double()[None]])
    if two_passes:
        average_gradients(accelerator, wrapper)
    totals = accelerator.reduce(stats, "sum").tolist()
    record.update(zip(("policy_loss", "value_loss", "clip_frac", "approx_kl", "value_clip_frac", "explained_variance",
                       "loss"), totals))
    return record


def main(cfg: PPOConfig) -> dict:
    stage = Stage(cfg, "ppo", unit="completions")
    accelerator, tokenizer = stage.accelerator, stage.load_tokenizer()
    rewards, prompts, data_report = online_inputs(cfg, tokenizer)  # before weights load
    model = stage.load_model()
    policy_value = add_value_function(model, stage.weights, lora_config_from(cfg) if cfg.value_model == "adapter"
                                      else None)
    kl = AdaptiveKLController(cfg.init_kl_coef, cfg.target_kl, cfg.kl_horizon)
    make = PPOBatches(cfg, policy_value, tokenizer, rewards, kl,
                      lambda t: accelerator.reduce(t.to(accelerator.device), "sum").cpu())
    batches = stage.online_batches(prompts, make)
    wrapper = stage.prepare(policy_value, batches)
    stage.resume()
    kl.value = stage.state.setdefault("kl_coef", kl.value)  # a resumed run goes on with the saved coefficient
    for window in stage.steps():  # (the window's rollouts are made as stage.steps() yields it)
        record = ppo_step(accelerator, wrapper, policy_value, cfg, window, stage.state["step"] + 1, make.names)
        stage.state["kl_coef"] = kl.value
        stage.update(record["loss"], record, units=stage.rows_per_step / cfg.updates)
    with policy_value.policy_only():  # the final greedy evaluation is the policy's
        return stage.finish(data=data_report)


if __name__ == "__main__":
    run_recipe(main, PPOConfig, __doc__)
