"""GRPO (and RLOO): online RL from rewarded samples, with LoRA, on the stage kit.

    accelerate launch recipes/sft.py --num_train_epochs 5 --output_dir out/sft_weak   # a weak start (44%)
    accelerate launch recipes/grpo.py --init_adapter out/sft_weak/adapter             # the demo: 73%
    accelerate launch recipes/grpo.py --init_adapter out/sft_weak/adapter --advantage rloo
    accelerate launch recipes/grpo.py --reward exact_match,my_rewards.py:brevity --reward_weights 1,0.2

Each step: draw prompts, sample ``num_generations`` completions of each with the current policy (one batched
KV-cache call; completion j of prompt i seeded by (seed, its place in the run, j), so any number of processes
draws the same rollouts), score them with the rewards, turn rewards into advantages (GRPO: group-centred,
scaled by the group's std, the batch's or not at all; RLOO: leave-one-out), then ``num_iterations`` updates of
the clipped policy loss on the completion tokens. ``--dynamic_sampling``: groups whose rewards are all equal
are replaced by those of further prompts. The reference for ``beta > 0``: the trainable adapter disabled.
``--rollout_backend server``: an OpenAI-compatible server (tools/serve.py, vLLM) samples from the adapter the run
gives it, synchronously or one step ahead (``--async_rollouts``), corrected by truncated importance weights
(minift.train.remote).
``per_device_train_batch_size`` counts completions and must divide by ``num_generations``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from minift.config import require
from minift.constants import IGNORE_INDEX
from minift.lora.layers import disable_adapters
from minift.losses import (
    GRPO_LOSS_TYPES,
    group_advantages,
    grpo_loss,
    rloo_advantages,
    rloo_rewards,
)
from minift.sections import DataSection, RolloutSection, TrainConfig
from minift.train.forward import TokenLogprobs, total_tokens
from minift.train.remote import tis_weights
from minift.train.rewards import Rewards
from minift.train.rollouts import Rollouts, online_inputs, rollout_params
from minift.train.stage import Stage, run_recipe

DATA = Path(__file__).resolve().parent / "data"


@dataclass
class GRPOConfig(RolloutSection, DataSection, TrainConfig):
    num_generations: int = field(default=8, metadata={"help": "completions per prompt (G)"})
    advantage: str = field(default="grpo", metadata={"help": "grpo (group-normalized) or rloo (leave-one-out)"})
    scale_rewards: str = field(default="group", metadata={"help": "grpo advantages / std of: group, batch, none"})
    loss_type: str = field(default="dapo", metadata={"help": "aggregation: grpo, bnpo, dr_grpo, dapo"})
    importance_sampling: str = field(default="token", metadata={"help": "token or sequence (GSPO) ratios"})
    epsilon: float = field(default=0.2, metadata={"help": "clip range below (and above, unless epsilon_high)"})
    epsilon_high: float | None = field(default=None, metadata={"help": "clip range above (DAPO: 0.28)"})
    beta: float = field(default=0.0, metadata={"help": "KL coefficient to the start model (0: no reference pass)"})
    mask_truncated_completions: bool = field(default=False, metadata={"help": "no loss on completions cut at "
                                                                              "max_completion_length"})
    num_iterations: int = field(default=1, metadata={"help": "policy updates per rollout batch (mu); > 1 keeps the "
                                                             "rollout policy's log-probs for the ratios"})
    dynamic_sampling: bool = field(default=False, metadata={"help": "DAPO: drop groups whose rewards are all equal "
                                                                    "and refill from the next prompts"})
    max_refills: int = field(default=4, metadata={"help": "dynamic sampling: further draws per batch at most"})
    # The demo: from a weak SFT start (44% held-out exact match), 16 prompts x 8 completions a step over the 4,000
    # demo prompts, exact-match reward: 73% after 4,000 steps (about 4.5 minutes on 2 CPU cores). In sweeps with an
    # earlier sampler, 10 epochs (63%) and lr 2e-3 (58%) did worse and lr 3e-4 barely moved in 2 epochs.
    DEMO_DATA, DEMO_EVAL = DATA / "demo_prompts.jsonl", DATA / "demo_eval.jsonl"
    RECORDS = "prompt"
    dataset_name_or_path: str = str(DEMO_DATA)
    output_dir: str = "out/grpo"
    per_device_train_batch_size: int = 128
    learning_rate: float = 1e-3
    num_train_epochs: float = 16.0
    lora_r: int = 16
    # On a real model, 64 full-length completions' activations need gradient checkpointing: without it a SmolLM2
    # step went past 24 GB (killed); with it, 3.7 GB peak and 141 s a step (16 a micro-batch without: 12.8 GB, 150 s).
    REAL_MODEL = {**TrainConfig.REAL_MODEL, "learning_rate": 1e-5, "num_train_epochs": 1.0,
                  "per_device_train_batch_size": 64, "max_completion_length": 256, "gradient_checkpointing": True}

    def batch_plan(self) -> tuple[int, int]:
        return self.per_device_train_batch_size // self.num_generations, self.num_iterations  # rows are prompts

    def check(self) -> None:
        checks = [(self.num_generations >= 2, "num_generations must be >= 2: advantages compare a prompt's completions"),
                  (self.per_device_train_batch_size % self.num_generations == 0,
                   f"per_device_train_batch_size ({self.per_device_train_batch_size}) counts completions and must "
                   f"divide by num_generations ({self.num_generations}): use a multiple of {self.num_generations}"),
                  (self.advantage in ("grpo", "rloo"), f"advantage must be grpo or rloo, got {self.advantage!r}"),
                  (self.scale_rewards in ("group", "batch", "none"), "scale_rewards must be group, batch or none"),
                  (self.loss_type in GRPO_LOSS_TYPES, f"loss_type must be one of {GRPO_LOSS_TYPES}"),
                  (self.importance_sampling in ("token", "sequence"), "importance_sampling must be token or sequence"),
                  (self.epsilon >= 0 and self.beta >= 0, "epsilon and beta must be >= 0"),
                  (self.num_iterations >= 1 and self.max_refills >= 0, "num_iterations must be >= 1, max_refills >= 0"),
                  self.saves_between_rollouts(self.num_iterations, "num_iterations"),
                  (self.beta == 0 or self.lora_r > 0, "beta > 0 compares with the start model, which a full "
                                                      "fine-tune (lora_r 0) does not keep: train an adapter")]
        require(checks)


class GRPOBatches:
    """``make(prompts, seeds, refill)``: the stage's online micro-batch: rollouts (minift.train.rollouts) with
    advantages, the reference's log-probs when ``beta > 0``, the rollout policy's when ``num_iterations > 1``, and
    the rollout metrics as one tensor (``names`` label it)."""

    def __init__(self, cfg: GRPOConfig, logps_model: TokenLogprobs, tokenizer, rewards: Rewards, adapter: str | None):
        self.rollouts = Rollouts(logps_model.model, tokenizer, rewards, rollout_params(cfg), cfg.num_generations,
                                 dynamic_sampling=cfg.dynamic_sampling, max_refills=cfg.max_refills)
        self.cfg, self.logps_model, self.adapter, self.names = cfg, logps_model, adapter, []

    @torch.no_grad()
    def __call__(self, prompts: list[dict], seeds: list[int], refill) -> dict:
        cfg, G = self.cfg, self.cfg.num_generations
        batch, metrics = self.rollouts(prompts, seeds, refill)
        total = batch.pop("rewards")
        if self.rollouts.server is None:
            del batch["sampler_logps"]  # fresh local rollouts: the policy is the sampler
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
        if cfg.beta > 0:  # the start model (trainable adapter off): the KL term, or folded into RLOO's rewards
            with disable_adapters(self.logps_model.model, [self.adapter]):
                batch["ref_logps"] = self.logps_model(**inputs)
        if cfg.num_iterations > 1 or (cfg.advantage == "rloo" and cfg.beta > 0):
            batch["old_logps"] = self.logps_model(**inputs)
        if cfg.advantage == "rloo":
            mask = batch["labels"][:, 1:] != IGNORE_INDEX
            shaped = total if cfg.beta == 0 else rloo_rewards(total, batch["old_logps"], batch["ref_logps"], mask,
                                                              beta=cfg.beta)
            batch["advantages"] = rloo_advantages(shaped, G)
        else:
            batch["advantages"] = group_advantages(total, G, scale=cfg.scale_rewards)
        if cfg.num_iterations == 1:
            batch.pop("old_logps", None)  # the first pass's own log-probs serve (ratio 1), no extra forward kept
        self.names = self.rollouts.packed(batch, metrics)
        return batch


def grpo_step(accelerator, logps_model, cfg: GRPOConfig, window: list[dict], names: list[str]) -> tuple[float, dict]:
    """The clipped policy loss over the window's completion tokens, one backward per micro-batch. The ratios are
    to the rollout policy: 1 on a batch's first update (the loss's gradient is then the policy gradient), clipped
    on the next ones when ``num_iterations > 1``."""
    masks = [(b["labels"][:, 1:] != IGNORE_INDEX) & ~(b["truncated"][:, None] & cfg.mask_truncated_completions)
             for b in window]
    num_items = total_tokens(accelerator, (m.sum() for m in masks)) / accelerator.num_processes
    totals, stats = torch.zeros((), device=accelerator.device), []
    kl_beta = cfg.beta if cfg.advantage == "grpo" else 0.0  # RLOO's KL is in its rewards, not a loss term
    remote = "sampler_logps" in window[0]
    for batch, mask in zip(window, masks):
        logps = logps_model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")})
        old = batch["old_logps"] if "old_logps" in batch else logps.detach()
        weights, tis = tis_weights(old, batch["sampler_logps"], mask, cfg.tis_cap) if remote else (None, {})
        loss, metrics = grpo_loss(logps, old, batch["advantages"], mask, ref_logps=batch.get("ref_logps"),
                                  beta=kl_beta, epsilon_low=cfg.epsilon, epsilon_high=cfg.epsilon_high,
                                  importance_sampling=cfg.importance_sampling, loss_type=cfg.loss_type,
                                  max_completion_length=cfg.max_completion_length, num_items=num_items,
                                  weights=weights)
        scale = 1.0 if cfg.loss_type == "dapo" else 1.0 / len(window)  # dapo divides by the window's tokens
        accelerator.backward(loss * scale)
        totals += loss.detach() * scale
        token_stats = torch.stack([metrics["clip_low"], metrics["clip_high"], metrics.get("kl", torch.zeros(())),
                                   *tis.values()])
        stats.append(torch.cat([batch["metrics"].to(accelerator.device),  # rollout means, then token-weighted sums
                                token_stats.double().to(accelerator.device) * mask.sum() * len(window) / num_items]))
    mean = accelerator.reduce(torch.stack(stats).mean(0), "mean").tolist()
    record = dict(zip(names + ["clip_low", "clip_high", "kl"] + list(tis), mean))
    if kl_beta == 0:
        del record["kl"]
    loss = accelerator.reduce(totals, "mean").item()
    record["loss"] = loss
    return loss, record


def main(cfg: GRPOConfig) -> dict:
    stage = Stage(cfg, "grpo", unit="completions")
    accelerator, tokenizer = stage.accelerator, stage.load_tokenizer()
    rewards, prompts, data_report = online_inputs(cfg, tokenizer)  # before weights load
    model = stage.load_model()
    logps_model = TokenLogprobs(model)
    make = GRPOBatches(cfg, logps_model, tokenizer, rewards, stage.adapter_name)
    batches = stage.online_batches(prompts, make)
    logps_model = stage.prepare(logps_model, batches)
    stage.resume()
    per_step = stage.rows_per_step
    for window in stage.steps():  # (the window's rollouts are made as stage.steps() yields it)
        loss, record = grpo_step(accelerator, logps_model, cfg, window, make.names)
        stage.update(loss, record, units=per_step)
    return stage.finish(data=data_report)


if __name__ == "__main__":
    run_recipe(main, GRPOConfig, __doc__)
