"""A Bradley-Terry reward model from preference pairs: the base + LoRA + a scalar head, on the stage kit.

    accelerate launch recipes/reward_model.py                                   # the demo pairs
    accelerate launch recipes/reward_model.py --init_adapter out/sft/adapter    # from an SFT adapter
    accelerate launch recipes/grpo.py --reward out/reward_model/merged          # then as a GRPO reward

Each pair's prompt + chosen and prompt + rejected answer are rendered as the reward then sees them
(``minift.train.rewards.reward_text``: the chat template, one assistant turn), scored at their last token by
a one-output sequence-classification head, and trained by ``−log σ(s_chosen − s_rejected)``. The head is
trained in full and saved in the adapter (``modules_to_save``), so ``output_dir/adapter`` alone restores the
reward model and ``output_dir/merged`` loads with ``AutoModelForSequenceClassification``. Logs held-out pair
accuracy (the share of pairs whose chosen answer scores higher).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from minift.data.formats import normalize_all
from minift.data.packing import collate_padded
from minift.data.read import train_eval_records
from minift.losses import reward_model_loss
from minift.sections import DataSection, TrainConfig
from minift.train.forward import evaluation_mode
from minift.train.rewards import reward_text
from minift.train.stage import Stage, run_recipe

DATA = Path(__file__).resolve().parent / "data"


@dataclass
class RewardConfig(DataSection, TrainConfig):
    DEMO_DATA, RECORDS = DATA / "demo_preference.jsonl", "preference"
    dataset_name_or_path: str = str(DEMO_DATA)
    output_dir: str = "out/reward_model"
    # The demo: 1,800 training pairs, 10 epochs: held-out pair accuracy from 54% to 70-75% in 25 s on 2 CPU
    # cores; it plateaus there (15-30 epochs: 70-76%; from the SFT adapter or a full fine-tune: no better).
    validation_split: float = 0.1
    learning_rate: float = 5e-4
    num_train_epochs: float = 10.0
    REAL_MODEL = {**TrainConfig.REAL_MODEL, "learning_rate": 1e-4, "num_train_epochs": 1.0}
    lora_r: int = 32
    lora_alpha: float = 64.0
    merge_output: bool = True  # output_dir/merged: the reward model as one directory, for --reward
    center_rewards_coefficient: float = field(default=0.0, metadata={
        "help": "weight of (s_chosen + s_rejected)^2, which keeps scores near 0 (0: off)"})

    def check(self) -> None:
        if self.center_rewards_coefficient < 0:
            raise ValueError(f"center_rewards_coefficient must be >= 0, got {self.center_rewards_coefficient}")


def build_pairs(cfg: RewardConfig, tokenizer) -> tuple[dict[str, list[dict]], dict]:
    """Records -> ``{"chosen": ids, "rejected": ids}`` per pair and split; pairs with a side over
    ``max_seq_length`` tokens are dropped (the score is read at the last token: cutting it would change it)."""
    splits = train_eval_records(cfg.dataset_name_or_path, cfg.eval_dataset, cfg.validation_split, cfg.seed)
    pairs, report = {}, {}
    for split, records in splits.items():
        if not records:
            pairs[split] = []
            continue
        norm = normalize_all(records, "preference", fmt=cfg.dataset_format, skip_invalid=cfg.skip_invalid)
        kept, too_long = [], 0
        for ex in norm.examples:
            sides = [tokenizer(reward_text(tokenizer, ex.prompt, answer), add_special_tokens=False)["input_ids"]
                     for answer in (ex.chosen, ex.rejected)]
            if max(map(len, sides)) > cfg.max_seq_length:
                too_long += 1
                continue
            kept.append({"chosen": sides[0], "rejected": sides[1]})
        pairs[split] = kept
        report[split] = {"formats": dict(norm.formats), "pairs": len(kept), "dropped_too_long": too_long,
                         "skipped_invalid": len(norm.skipped)}
    return pairs, report


def collate(pairs: list[dict], pad_token_id: int) -> dict:
    """One right-padded batch: every chosen row, then every rejected row."""
    rows = [{"input_ids": p[side], "labels": p[side]} for side in ("chosen", "rejected") for p in pairs]
    batch = collate_padded(rows, pad_token_id)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


class PairScores(nn.Module):
    """The reward model's scores ``(2B,)`` float32 (HF's head reads the last non-padding token)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()


def pair_sums(scores: torch.Tensor, cfg: RewardConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair losses and ``[loss sum, correct pairs, pairs, chosen score sum, rejected score sum]``."""
    chosen, rejected = scores.chunk(2)
    losses = reward_model_loss(chosen, rejected, center_coefficient=cfg.center_rewards_coefficient)
    sums = torch.stack([losses.sum(), (chosen > rejected).float().sum(), chosen.new_tensor(float(len(chosen))),
                        chosen.sum(), rejected.sum()]).detach().double()
    return losses, sums


def means(sums: torch.Tensor, prefix: str = "") -> dict[str, float]:
    loss, correct, n, chosen, rejected = sums.tolist()
    return {f"{prefix}loss": loss / n, f"{prefix}accuracy": correct / n, f"{prefix}scores/chosen": chosen / n,
            f"{prefix}scores/rejected": rejected / n}


def main(cfg: RewardConfig) -> dict:
    stage = Stage(cfg, "reward_model", unit="pairs")
    accelerator, tokenizer = stage.accelerator, stage.load_tokenizer()
    pairs, data_report = build_pairs(cfg, tokenizer)  # data errors before weights load
    batches = stage.fixed_batches(pairs["train"], lambda b: collate(b, tokenizer.pad_token_id), what="pairs")
    model = stage.load_model(task="seq_cls")
    scorer = PairScores(model)
    chunk, world = cfg.per_device_eval_batch_size, accelerator.num_processes
    eval_batches = [collate(pairs["eval"][i: i + chunk], tokenizer.pad_token_id)
                    for i in range(0, len(pairs["eval"]), chunk)][accelerator.process_index::world]

    @torch.no_grad()
    def evaluate(wrapper) -> dict[str, float]:
        sums = torch.zeros(5, dtype=torch.float64)
        with accelerator.autocast(), evaluation_mode(wrapper):
            for batch in eval_batches:
                sums += pair_sums(wrapper(**{k: v.to(accelerator.device) for k, v in batch.items()}), cfg)[1].cpu()
        return means(accelerator.reduce(sums.to(accelerator.device), "sum").cpu(), "eval_")

    scorer = stage.prepare(scorer, batches, evaluate=evaluate if pairs["eval"] else None)
    if stage.resume() == 0 and pairs["eval"]:
        stage.state["before"]["pair_accuracy_before"] = evaluate(scorer)["eval_accuracy"]
    per_step = stage.rows_per_step
    for window in stage.steps():
        sums = torch.zeros(5, dtype=torch.float64, device=accelerator.device)
        for i, batch in enumerate(window):
            with contextlib.nullcontext() if i == len(window) - 1 else accelerator.no_sync(scorer):
                losses, batch_sums = pair_sums(scorer(**batch), cfg)
                accelerator.backward(losses.sum() * world / per_step)  # each pair weighs 1 / the step's pairs
            sums += batch_sums.to(sums.device)
        record = means(accelerator.reduce(sums, "sum").cpu())
        stage.update(record["loss"], record, units=per_step)

    def final_metrics(result: dict) -> dict:
        return {"pair_accuracy": result["eval_accuracy"]} if "eval_accuracy" in result else {}

    return stage.finish(data=data_report, after=final_metrics)


if __name__ == "__main__":
    run_recipe(main, RewardConfig, __doc__)
