"""Preference optimization (DPO and its family, IPO, SimPO, CPO, ORPO) with LoRA, written out on Accelerate.

    accelerate launch recipes/dpo.py --init_adapter out/sft/adapter         # DPO from an SFT adapter
    accelerate launch recipes/dpo.py --loss_type ipo --beta 0.5 --precompute_ref_log_probs true
    accelerate launch --multi_gpu --num_processes 2 recipes/dpo.py           # two processes (gloo on CPU)

Reads prompt/chosen/rejected pairs (strings or messages, or implicit-prompt conversations). The
reference model is the model the stage starts from (base + init_adapter): the same weights with the
trainable adapter disabled, or log-probs computed once before training and cached in output_dir.
Chosen and rejected answers go through one packed forward. Writes ``output_dir/adapter``,
``metrics.jsonl``, ``run.json`` and checkpoints, like the SFT recipe.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from minift.adapters import merge_and_save
from minift.checkpoints import (
    ADAPTER,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
    save_weights,
)
from minift.config import ConfigError, TrainConfig, check_paths, parse_config
from minift.data import load_records, split_records
from minift.encode import encode_preferences, encode_prompts, set_chat_template
from minift.formats import normalize_all
from minift.lora import disable_adapters
from minift.losses import DPO_LOSS_TYPES
from minift.pairs import (
    METRICS,
    REFERENCE_FREE,
    Reference,
    collate_pairs,
    greedy_matches,
    mean_metrics,
    metric_sums,
    pair_logps,
    preference_loss,
    reference_key,
)
from minift.rollout import SequenceLogprobs, answer_accuracy
from minift.train import (
    MetricsLog,
    ShardedBatches,
    Throughput,
    close_processes,
    end_stage,
    load_for_training,
    make_accelerator,
    make_optimizer,
    make_scheduler,
    plot_losses,
    push_to_hub,
    total_steps,
    write_run_json,
)

DATA = Path(__file__).resolve().parent / "data"
logger = logging.getLogger("minift.dpo")


@dataclass
class DPOConfig(TrainConfig):
    output_dir: str = "out/dpo"
    # The demo's defaults: from the SFT demo's adapter, one epoch over the 1,800 training pairs gives
    # 92.5% held-out implicit-reward accuracy (90% with --seed 1, another split).
    learning_rate: float = 1e-3
    num_train_epochs: float = 1.0
    lora_r: int = 32  # alpha stays 32: scale 1.0
    validation_split: float = 0.1
    dataset_name_or_path: str = field(default=str(DATA / "demo_preference.jsonl"),
                                      metadata={"help": "prompt/chosen/rejected pairs: file, directory or hub name"})
    eval_dataset: str | None = field(default=None, metadata={"help": "explicit validation pairs (else validation_split)"})
    dataset_format: str | None = field(default=None, metadata={"help": "skip detection: preference or "
                                                                       "preference_implicit"})
    skip_invalid: bool = field(default=False, metadata={"help": "count and skip broken records instead of failing"})
    chat_template: str | None = field(default=None, metadata={"help": "a Jinja chat template file to use"})
    max_seq_length: int = field(default=128, metadata={"help": "tokens per prompt + answer (and per packed row)"})
    packing: bool = field(default=True, metadata={"help": "chosen and rejected answers as documents of one "
                                                          "padding-free row (false: padded rows)"})
    truncation: str = field(default="truncate", metadata={"help": "truncate or drop over-long pairs"})
    loss_type: str = field(default="sigmoid", metadata={"help": "a DPO loss type (sigmoid, ipo, hinge, robust, ...) "
                                                                "or simpo, cpo, orpo"})
    beta: float = field(default=0.5, metadata={"help": "inverse temperature of the implicit reward"})
    label_smoothing: float = field(default=0.0, metadata={"help": "conservative DPO / robust / EXO epsilon"})
    rpo_alpha: float = field(default=0.0, metadata={"help": "weight of the chosen answers' NLL (RPO; CPO's alpha)"})
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO's target reward margin"})
    precompute_ref_log_probs: bool = field(default=False, metadata={"help": "compute reference log-probs once "
                                                                            "before training (cached in output_dir)"})
    answer_eval_dataset: str | None = field(
        default="auto", metadata={"help": "prompts with answers for greedy exact match; auto = demo eval with demo data"})
    max_new_tokens: int = field(default=16, metadata={"help": "generation budget of the exact-match eval"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss_type not in DPO_LOSS_TYPES + REFERENCE_FREE:
            raise ValueError(f"loss_type must be one of {', '.join(DPO_LOSS_TYPES + REFERENCE_FREE)}; "
                             f"got {self.loss_type!r}")
        if self.truncation not in ("truncate", "drop"):
            raise ValueError(f"truncation must be truncate or drop, got {self.truncation!r}")
        if self.beta <= 0 or not 0 <= self.label_smoothing < 0.5 or self.rpo_alpha < 0:
            raise ValueError("beta must be > 0, label_smoothing in [0, 0.5) and rpo_alpha >= 0")
        check_paths(self, ("dataset_name_or_path", "eval_dataset", "answer_eval_dataset"),
                    ("chat_template", "init_adapter"))
        if self.answer_eval_dataset == "auto":
            demo = Path(self.dataset_name_or_path).resolve() == (DATA / "demo_preference.jsonl")
            self.answer_eval_dataset = str(DATA / "demo_eval.jsonl") if demo else None


def build_pairs(cfg: DPOConfig, tokenizer) -> tuple[dict[str, list[dict]], dict]:
    """Records -> preference pairs -> tokens with answer-only labels, each pair tagged with its index."""
    records = load_records(cfg.dataset_name_or_path, "train")
    if cfg.eval_dataset:
        splits = {"train": records, "eval": load_records(cfg.eval_dataset, "validation")}
    else:
        splits = dict(zip(("train", "eval"), split_records(records, cfg.validation_split, cfg.seed)))
    pairs, report = {}, {}
    for split, recs in splits.items():
        norm = normalize_all(recs, "preference", fmt=cfg.dataset_format, skip_invalid=cfg.skip_invalid) if recs else None
        encoded, enc_report = encode_preferences(norm.examples, tokenizer, max_seq_length=cfg.max_seq_length,
                                                 truncation=cfg.truncation) if norm else ([], None)
        pairs[split] = [{**p, "index": i} for i, p in enumerate(encoded)]
        if norm:
            report[split] = {"formats": dict(norm.formats), "skipped_invalid": len(norm.skipped), **vars(enc_report)}
    return pairs, report


def evaluate_pairs(accelerator, logps_model, reference, cfg: DPOConfig, batches: list[dict], split: str = "eval",
                   prefix: str = "eval_") -> dict[str, float]:
    """Mean loss, rewards and accuracies over this process's batches of pairs, summed over processes."""
    was_training = logps_model.training
    logps_model.eval()
    sums = torch.zeros(len(METRICS) + 1, dtype=torch.float64)
    with torch.no_grad(), accelerator.autocast():
        for batch in batches:
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            policy = pair_logps(logps_model, batch)
            ref = None if cfg.loss_type in REFERENCE_FREE else reference(batch, split)
            sums += metric_sums(*preference_loss(cfg, policy, ref), policy[0], policy[1]).double().cpu()
    logps_model.train(was_training)
    return mean_metrics(accelerator.reduce(sums.to(accelerator.device), "sum").cpu(), prefix)


def generation_metrics(cfg: DPOConfig, model, tokenizer, answer_examples, eval_pairs, suffix: str = "") -> dict:
    """Greedy generation: exact match on the answer eval set, and how often held-out pairs get their chosen
    (or rejected) answer word for word."""
    out = {}
    if answer_examples:
        out["answer_accuracy"] = answer_accuracy(model, tokenizer, answer_examples, max_new_tokens=cfg.max_new_tokens)
    if eval_pairs:
        out["greedy_matches_chosen"], out["greedy_matches_rejected"] = greedy_matches(
            model, tokenizer, eval_pairs, max_new_tokens=cfg.max_new_tokens)
    return {k + suffix: v for k, v in out.items()}


def main(cfg: DPOConfig) -> dict:
    started = time.time()
    accelerator = make_accelerator(cfg)
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    model, tokenizer = load_for_training(cfg)
    set_chat_template(tokenizer, cfg.chat_template)
    pairs, data_report = build_pairs(cfg, tokenizer)
    answer_examples = encode_prompts(normalize_all(load_records(cfg.answer_eval_dataset), "prompt").examples, tokenizer,
                                     max_prompt_length=cfg.max_seq_length)[0] if cfg.answer_eval_dataset else []
    collate = partial(collate_pairs, pad_token_id=tokenizer.pad_token_id, packing=cfg.packing,
                      max_seq_length=cfg.max_seq_length)

    logps_model = SequenceLogprobs(model)
    reference = Reference(logps_model, ADAPTER if cfg.lora_r > 0 else None)
    optimizer = make_optimizer(cfg, model)
    logps_model, optimizer = accelerator.prepare(logps_model, optimizer)
    rank, world = accelerator.process_index, accelerator.num_processes
    batches = ShardedBatches(pairs["train"], cfg.per_device_train_batch_size, world, rank, cfg.seed, collate)
    chunk = cfg.per_device_eval_batch_size
    eval_pairs = [pairs["eval"][i: i + chunk] for i in range(0, len(pairs["eval"]), chunk)]
    eval_batches = [collate(b) for b in eval_pairs[rank::world]]
    if cfg.loss_type not in REFERENCE_FREE and (cfg.precompute_ref_log_probs or cfg.lora_r == 0):
        # Before any checkpoint is loaded: the reference is the start model. A full fine-tune has no
        # adapter to switch off, so it always precomputes.
        train_pairs = [pairs["train"][i: i + chunk] for i in range(0, len(pairs["train"]), chunk)]
        reference.precompute(accelerator, {"train": train_pairs, "eval": eval_pairs}, collate,
                             Path(cfg.output_dir) / "reference_logps.safetensors",
                             reference_key(cfg, pairs, accelerator.mixed_precision))
    steps = total_steps(cfg, batches)
    scheduler = make_scheduler(cfg, optimizer, steps)
    params = [p for p in model.parameters() if p.requires_grad]
    accum = cfg.gradient_accumulation_steps
    pairs_per_step = cfg.per_device_train_batch_size * accum * world

    state = {"step": 0, "best_eval_loss": None, "best_checkpoint": None, "bad_evals": 0}
    checkpoint = find_checkpoint(cfg.output_dir, cfg.resume_from_checkpoint) if cfg.resume_from_checkpoint else None
    if checkpoint:
        state = load_checkpoint(checkpoint, accelerator, cfg, model, optimizer, scheduler)
        logger.info("resumed from %s at step %d", checkpoint, state["step"])
    metrics = MetricsLog(accelerator, cfg.output_dir, resume_step=state["step"])
    if cfg.report_to != "none":
        accelerator.init_trackers("minift-dpo", config={k: str(v) for k, v in vars(cfg).items()})
    evaluate = partial(evaluate_pairs, accelerator, accelerator.unwrap_model(logps_model), reference, cfg, eval_batches)
    before = {}
    if state["step"] == 0 and eval_batches:
        # How the models rank the held-out pairs before training: the start model, and the bare base.
        before["preference_accuracy_before"] = evaluate()["eval_logps/accuracies"]
        if cfg.lora_r > 0:
            with disable_adapters(model):
                before["preference_accuracy_base"] = evaluate()["eval_logps/accuracies"]
        if accelerator.is_main_process:
            before.update(generation_metrics(cfg, model, tokenizer, answer_examples, pairs["eval"], "_before"))
        logger.info("before training: %s", before)

    bar = tqdm(total=steps, initial=state["step"], desc=cfg.loss_type, disable=not accelerator.is_main_process)
    speed, record, eval_result = Throughput(), {}, {}
    logps_model.train()
    for step in range(state["step"] + 1, steps + 1):
        # One optimizer step = `accum` micro-batches of pairs on every process. Each pair's loss is divided
        # by the pairs of the whole step, so any split of the same pairs gives the same gradient.
        window = [{k: v.to(accelerator.device) for k, v in batches.micro_batch(m).items()}
                  for m in range((step - 1) * accum, step * accum)]
        sums = torch.zeros(len(METRICS) + 1, device=accelerator.device)
        for i, batch in enumerate(window):
            with accelerator.autocast():
                ref = None if cfg.loss_type in REFERENCE_FREE else reference(batch, "train")  # no grad
            with contextlib.nullcontext() if i == len(window) - 1 else accelerator.no_sync(logps_model):
                policy = pair_logps(logps_model, batch)  # chosen and rejected in one forward
                losses, r_chosen, r_rejected = preference_loss(cfg, policy, ref)
                accelerator.backward(losses.sum() * world / pairs_per_step)
            sums += metric_sums(losses, r_chosen, r_rejected, policy[0], policy[1]).to(sums.device)
        record = mean_metrics(accelerator.reduce(sums, "sum"))
        if not math.isfinite(record["loss"]):
            raise FloatingPointError(
                f"loss is {record['loss']} at step {step}; stopping. The last good checkpoint is "
                f"{find_checkpoint(cfg.output_dir, 'auto') or 'none (none was saved yet)'}. Lower the learning "
                f"rate or beta, or check the data.")
        grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] = step
        speed.add(pairs_per_step)
        bar.update(1)

        if cfg.logging_steps and (step % cfg.logging_steps == 0 or step == steps):
            logged = {**record, "lr": scheduler.get_last_lr()[0], "pairs_per_s": speed.rate(),
                      "epoch": step * accum / batches.per_epoch}
            if grad_norm is not None:
                logged["grad_norm"] = float(grad_norm)
            metrics.log(logged, step)
            bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['rewards/accuracies']:.2f}")
        improved = False
        if eval_batches and ((cfg.eval_steps and step % cfg.eval_steps == 0) or step == steps):
            eval_result = evaluate()
            metrics.log(eval_result, step)
            improved = state["best_eval_loss"] is None or eval_result["eval_loss"] < state["best_eval_loss"]
            state["bad_evals"] = 0 if improved else state["bad_evals"] + 1
            if improved:
                state["best_eval_loss"] = eval_result["eval_loss"]
        stop = cfg.early_stopping_patience and state["bad_evals"] >= cfg.early_stopping_patience
        if cfg.save_steps and (step % cfg.save_steps == 0 or improved or stop):
            if improved:
                state["best_checkpoint"] = str(Path(cfg.output_dir) / f"checkpoint-{step}")
            save_checkpoint(accelerator, cfg, accelerator.unwrap_model(logps_model).model, optimizer, scheduler, state)
        if stop:
            logger.info("early stopping at step %d: no eval improvement in %d evaluations", step, state["bad_evals"])
            break
    bar.close()

    result = {"step": state["step"], "train_loss": record.get("loss"), **eval_result, **before}
    if eval_result:
        result["preference_accuracy"] = eval_result["eval_logps/accuracies"]
    out = Path(cfg.output_dir)
    if accelerator.is_main_process:
        save_weights(model, out, cfg)
        if cfg.lora_r == 0:
            tokenizer.save_pretrained(out / "model")
        result.update(generation_metrics(cfg, model, tokenizer, answer_examples, pairs["eval"]))
        logger.info("after training: %s", {k: v for k, v in result.items() if "accura" in k or "greedy" in k})
        adapter = out / ("adapter" if cfg.lora_r > 0 else "model")
        chain = [cfg.init_adapter] if cfg.init_adapter else []
        merged = merge_and_save(cfg.model_name_or_path, chain + [str(adapter)], out / "merged") \
            if cfg.merge_output and cfg.lora_r > 0 else None
        hub_url = push_to_hub(cfg, adapter if cfg.push_adapter_only or merged is None else merged) \
            if cfg.push_to_hub else None
        plot = plot_losses(metrics.history, out / "loss.png")
        write_run_json(cfg, cfg.output_dir, stage="dpo", adapter=str(adapter), parents=chain, merged=merged,
                       hub_url=hub_url, loss_plot=plot, metrics=result, data=data_report,
                       best_checkpoint=state["best_checkpoint"], seconds=round(time.time() - started, 2))
    end_stage(accelerator)
    return result


if __name__ == "__main__":
    try:
        main(parse_config(DPOConfig, description=__doc__.split("\n\n")[0]))
    except (ConfigError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    finally:
        close_processes()
