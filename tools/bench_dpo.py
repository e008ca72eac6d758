"""DPO training steps on the SFT benchmark's model A: minift's variants, an SFT step, and trl's DPOTrainer.

    python tools/bench.py dpo [--steps 6] [--warmup 1] [--reps 2] [--threads 2]

Model A (random Llama, hidden 512, 8 layers, vocab 32k) with bf16 frozen weights, LoRA r16 / alpha 32 on
all 7 projections (fp32 A/B), bf16 autocast on CPU, no gradient checkpointing, AdamW lr 1e-4, gradient
clipping 1.0. Each step trains 4 pairs: a 128-token prompt, chosen and rejected answers of 64-256 tokens
(uniform, seeded; random token ids, the same on every side), sigmoid DPO with beta 0.1.

Sides, each alone in a fresh process, in rotating order, ``--reps`` times:
- ``packed``: minift, chosen and rejected packed into 512-token rows (one forward), reference = the
  same model with the LoRA adapter disabled (a second no-grad forward);
- ``padded``: the same with chosen rows then rejected rows padded to the longest;
- ``precomputed``: packed, reference log-probs computed once before the timed steps (the time that
  takes is reported separately);
- ``sft``: an SFT step on the same 8 sequences per step (prompt + answer, answer tokens trained,
  packed), minift's ``CausalLMLoss``: the memory baseline;
- ``trl``: trl's ``DPOTrainer`` with a peft ``LoraConfig`` (same rank, alpha, targets), the model in
  bf16, ``bf16=True``, gradient checkpointing off, batch 4 pairs, its reference by disabling the
  adapter. It is fed the same token ids through its own tokenized-dataset columns (``prompt_ids``,
  ``chosen_ids``, ``rejected_ids``), its text preprocessing skipped.

Step time is end to end (data collation included), warm-up steps excluded; peak memory is the growth
of the process's peak RSS (VmHWM) from just before the first step (model and data built) to the end,
warm-up included, so the optimizer state (lazily created by the first step) counts on every side.
Goals: packed peak growth <= 1.15x the SFT step's, and against trl: step time <= 0.9x and peak growth
<= trl's. Packed vs padded and precomputed vs live reference are printed for information.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

PAIRS_PER_STEP, PROMPT, ANSWER = 4, 128, (64, 256)
ROW = 512  # packed row length: prompt + the longest answer (384) fits
BETA, LR, MAX_GRAD_NORM = 0.1, 1e-4, 1.0
SIDES = ("packed", "padded", "precomputed", "sft", "trl")


def make_pairs(n: int, vocab: int, seed: int = 0) -> list[dict]:
    """``n`` pairs in minift's encoded layout (labels -100 on the prompt), the same ids for every side."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        prompt = [rng.randrange(3, vocab) for _ in range(PROMPT)]
        pair = {"index": i, "prompt": prompt}
        for side in ("chosen", "rejected"):
            answer = [rng.randrange(3, vocab) for _ in range(rng.randint(*ANSWER))]
            pair[f"{side}_input_ids"] = prompt + answer
            pair[f"{side}_labels"] = [-100] * PROMPT + answer
        pairs.append(pair)
    return pairs


def peak_growth(start_rss: float) -> float:
    from bench import rss_mib

    return rss_mib("VmHWM") - start_rss


def run_minift(side: str, args: argparse.Namespace) -> dict:
    """One minift side: warm-up steps, then ``args.steps`` timed steps; times, tokens and peak RSS growth."""
    from bench import SFT_MODEL, minift_sft_model, reset_peak_rss

    from minift.packing import collate_packed, pack_examples
    from minift.pairs import Reference, collate_pairs, pair_logps
    from minift.rollout import SequenceLogprobs
    from minift.train import ADAPTER, CausalLMLoss

    n_steps = args.warmup + args.steps
    pairs = make_pairs(PAIRS_PER_STEP * n_steps, SFT_MODEL["vocab_size"])
    steps = [pairs[i:i + PAIRS_PER_STEP] for i in range(0, len(pairs), PAIRS_PER_STEP)]
    model = minift_sft_model(SFT_MODEL)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    cfg = argparse.Namespace(loss_type="sigmoid", beta=BETA, label_smoothing=0.0, rpo_alpha=0.0, simpo_gamma=0.0)
    logps_model = SequenceLogprobs(model)
    reference = Reference(logps_model, ADAPTER)
    loss_model = CausalLMLoss(model)
    info = {}
    if side == "precomputed":
        start = time.perf_counter()
        collate = lambda b: collate_pairs(b, 0, packing=True, max_seq_length=ROW)  # noqa: E731
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tables = {"train": torch.zeros(len(pairs), 2)}
            for batch_pairs in steps:
                batch = collate(batch_pairs)
                chosen, rejected = reference(batch, "train")
                tables["train"][batch["pair_index"]] = torch.stack([chosen, rejected], 1).float()
        reference.tables = tables
        info["precompute_s"] = time.perf_counter() - start

    def step(batch_pairs: list[dict]) -> tuple[float, int]:
        from minift.pairs import preference_loss

        optimizer.zero_grad(set_to_none=True)
        if side == "sft":
            docs = [{"input_ids": p[f"{s}_input_ids"], "labels": p[f"{s}_labels"]}
                    for p in batch_pairs for s in ("chosen", "rejected")]
            rows, _ = pack_examples(docs, ROW)
            batch = collate_packed(rows, 0)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                total, count = loss_model(**batch)
            loss = total / count
        else:
            batch = collate_pairs(batch_pairs, 0, packing=side != "padded", max_seq_length=ROW)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                ref = reference(batch, "train")
                policy = pair_logps(logps_model, batch)
                losses, _, _ = preference_loss(cfg, policy, ref)
            loss = losses.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        return loss.item(), int(batch["input_ids"].numel())

    start_rss = reset_peak_rss()
    for batch_pairs in steps[:args.warmup]:
        step(batch_pairs)
    times, cells, losses = [], [], []
    for batch_pairs in steps[args.warmup:]:
        t0 = time.perf_counter()
        loss, n = step(batch_pairs)
        times.append(time.perf_counter() - t0)
        cells.append(n)
        losses.append(loss)
    return {"times": times, "cells": cells, "first_loss": losses[0], "growth": peak_growth(start_rss), **info}


def run_trl(args: argparse.Namespace) -> dict:
    """trl's DPOTrainer + peft on the same pairs; per-step times from a callback."""
    import tempfile

    import transformers as tf
    from bench import SFT_ADAPTER, SFT_MODEL, build_sft_model, reset_peak_rss
    from datasets import Dataset
    from peft import LoraConfig as PeftLoraConfig
    from trl import DPOConfig, DPOTrainer

    from minift.models import tiny_model_dir

    n_steps = args.warmup + args.steps
    pairs = make_pairs(PAIRS_PER_STEP * n_steps, SFT_MODEL["vocab_size"])
    dataset = Dataset.from_dict({"prompt_ids": [p["prompt"] for p in pairs],
                                 "chosen_ids": [p["chosen_input_ids"][PROMPT:] for p in pairs],
                                 "rejected_ids": [p["rejected_input_ids"][PROMPT:] for p in pairs]})
    ends, state = [], {}

    class Timer(tf.TrainerCallback):
        def on_train_begin(self, *a, **k):
            state["start_rss"] = reset_peak_rss()
            ends.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            ends.append(time.perf_counter())

    class PretokenizedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset  # already prompt_ids / chosen_ids / rejected_ids

    config = DPOConfig(output_dir=tempfile.mkdtemp(prefix="minift-bench-dpo-"), report_to="none", save_strategy="no",
                       disable_tqdm=True, num_train_epochs=1, per_device_train_batch_size=PAIRS_PER_STEP,
                       learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=MAX_GRAD_NORM, beta=BETA,
                       max_length=None, bf16=True, use_cpu=True, gradient_checkpointing=False, seed=0,
                       logging_steps=1, optim="adamw_torch", weight_decay=0.0)
    peft_config = PeftLoraConfig(r=SFT_ADAPTER["r"], lora_alpha=SFT_ADAPTER["lora_alpha"], lora_dropout=0.0,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = PretokenizedDPOTrainer(model=build_sft_model(SFT_MODEL, "bf16"), args=config, train_dataset=dataset,
                                     processing_class=tf.AutoTokenizer.from_pretrained(tiny_model_dir()),
                                     peft_config=peft_config, callbacks=[Timer()])
    trainer.train()
    times = [b - a for a, b in zip(ends, ends[1:])][args.warmup:]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    cells = [2 * PAIRS_PER_STEP * (PROMPT + ANSWER[1])] * len(times)  # unknown per step; not used in ratios
    return {"times": times, "cells": cells, "first_loss": losses[args.warmup] if losses else float("nan"),
            "growth": peak_growth(state["start_rss"]),
            "info": f"trl DPOTrainer, peft LoraConfig r{SFT_ADAPTER['r']}, bf16 model, bf16=True, "
                    f"gradient_checkpointing=False, padding_free={trainer.padding_free}"}


def run(args: argparse.Namespace) -> bool:
    """DPO step of model A: minift packed / padded / precomputed vs an SFT step and trl's DPOTrainer."""
    from bench import run_worker

    torch.set_num_threads(args.threads)
    if args._worker:
        result = run_trl(args) if args._worker == "trl" else run_minift(args._worker, args)
        print("RESULT " + json.dumps(result))
        return True
    sides = [s for s in SIDES if s != "trl" or _has_trl()]
    print(f"model A, LoRA r16 all-linear, bf16 autocast, {PAIRS_PER_STEP} pairs per step (prompt {PROMPT}, "
          f"answers {ANSWER[0]}-{ANSWER[1]} tokens), sigmoid DPO beta {BETA}; {args.threads} threads; each side "
          f"a fresh process: {args.warmup} warm-up step(s), {args.steps} timed; {args.reps} repetitions, rotating")
    results: dict[str, list[dict]] = {s: [] for s in sides}
    for rep in range(args.reps):
        order = sides[rep % len(sides):] + sides[:rep % len(sides)]
        for side in order:
            results[side].append(run_worker(side, args, case="dpo"))
            r = results[side][-1]
            print(f"  rep {rep + 1} {side:<12} median step {statistics.median(r['times']):.2f} s, "
                  f"peak growth {r['growth']:.0f} MiB")
    summary = {}
    print(f"\n{'side':<12} {'first loss':>10} {'median s/step':>14} {'pairs/s':>8} {'cells/step':>10} "
          f"{'peak growth MiB':>16}")
    for side, runs in results.items():
        step_s = statistics.median(t for r in runs for t in r["times"])
        growth = statistics.median(r["growth"] for r in runs)
        cells = statistics.median(c for r in runs for c in r["cells"]) if side != "trl" else float("nan")
        summary[side] = (step_s, growth)
        print(f"{side:<12} {runs[0]['first_loss']:>10.4f} {step_s:>14.2f} {PAIRS_PER_STEP / step_s:>8.2f} "
              f"{cells:>10.0f} {growth:>16.0f}")
    if "precomputed" in results:
        pre = statistics.median(r["precompute_s"] for r in results["precomputed"])
        print(f"precomputing the reference for {PAIRS_PER_STEP * (args.warmup + args.steps)} pairs took {pre:.1f} s "
              f"(once, before training)")
    if "trl" in results:
        print(results["trl"][0]["info"])
    verdict = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
    mem = summary["packed"][1] / summary["sft"][1]
    ok = mem <= 1.15
    print(f"\npeak growth DPO (packed, disabled-adapter reference) / SFT step = {mem:.2f}x (goal <= 1.15x): "
          f"{verdict(mem <= 1.15)}")
    print(f"step time packed / padded = {summary['packed'][0] / summary['padded'][0]:.2f}x; precomputed / live "
          f"reference = {summary['precomputed'][0] / summary['packed'][0]:.2f}x (information)")
    if "trl" in summary:
        speed = summary["packed"][0] / summary["trl"][0]
        mem_ok = summary["packed"][1] <= summary["trl"][1]
        ok = ok and speed <= 0.9 and mem_ok
        print(f"vs trl DPOTrainer: step time minift (packed, the recipe's default) / trl = {speed:.2f}x (goal <= "
              f"0.9x): {verdict(speed <= 0.9)}; padded / trl = {summary['padded'][0] / summary['trl'][0]:.2f}x")
        print(f"vs trl DPOTrainer: peak growth {summary['packed'][1]:.0f} vs {summary['trl'][1]:.0f} MiB "
              f"(goal <=): {verdict(mem_ok)}")
    else:
        ok = False
        print("trl / peft not installed: no comparison with DPOTrainer, no verdict on it")
    return ok


def _has_trl() -> bool:
    try:
        import peft  # noqa: F401
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=6, help="timed steps per process (default 6)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument("--reps", type=int, default=2, help="processes per side, rotating order (default 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every process (default 2)")
    parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
