"""DPO training steps on the SFT benchmark's model A: minift's variants, an SFT step, and trl's DPOTrainer.

    python tools/bench.py dpo [--steps 6] [--warmup 1] [--reps 2] [--threads 2]

Model A (random Llama, hidden 512, 8 layers, vocab 32k; ``bench_common.minift_sft_model``): bf16 frozen
weights, LoRA r16 / alpha 32 on all 7 projections with fp32 A/B, bf16 autocast on CPU (fp32 throughout where
the CPU has no native bf16 units; ``--precision``), no gradient
checkpointing. One optimizer step trains 4 pairs: a 128-token prompt (labels -100) and chosen and
rejected answers of 64-256 tokens each (uniform, seeded; random ids, the last one EOS, as
``encode_preferences`` ends an answer; its untrained newline after the ChatML end of turn is left
out), the same ids and the same 4 pairs per step on every side. Step = one forward of chosen and
rejected together, sigmoid DPO (beta 0.1), mean over pairs, backward, gradient clipping 1.0, AdamW
lr 1e-4, as recipes/dpo.py.

Sides, each alone in a fresh process with ``--threads`` torch threads, ``--reps`` times in A B B A order:
- ``packed``: minift, chosen and rejected answers packed as separate documents into 512-token rows
  (prompt + the longest answer = 384 fits) and laid out as one flat row (``collate_pairs(packing=True)``: no
  padding, document attention), reference = the model
  with the LoRA adapter disabled (``Reference(.., DEFAULT_ADAPTER)``: a second, no-grad forward);
- ``padded``: the same with ``collate_pairs(packing=False)`` (chosen rows, then rejected rows);
- ``precomputed``: packed, reference log-probs from ``Reference.precompute`` run once over all pairs
  before the first step (its time is printed apart, not in the steps);
- ``sft``: ``bench_common.MiniftSFT`` (``CausalLMLoss``) on the same 8 sequences per step, packed into 512:
  the memory baseline;
- ``trl``: trl's ``DPOTrainer`` + a peft ``LoraConfig`` (same r, alpha, all-linear, dropout 0) on the
  same weights, ``bf16`` as the precision, ``use_cpu=True``, gradient checkpointing off, batch 4, pairs in
  order (sequential sampler), reference by disabling the adapter. trl 1.16 tokenizes text in
  ``_prepare_dataset``; a subclass skips it and hands the collator the ``prompt_ids`` / ``chosen_ids``
  / ``rejected_ids`` columns it reads, and each batch is checked to hold the same token ids as
  minift's padded one.

Step time: wall time of the whole step (collation included; for trl, between ``on_step_end`` callbacks),
``--warmup`` first steps excluded; the table gives the median and the best over all timed steps of all
repetitions, and the median process CPU time (all threads; less inflated by other processes' load).
Peak memory ("peak growth"): the process's peak RSS (VmHWM, reset with ``reset_peak_rss``) minus its
RSS at set-up end (model, LoRA, optimizer and data built: for trl at ``on_train_begin``), over the
warm-up and timed steps, so the optimizer state made by the first step counts on every side. "timed
growth" is the same counter reset again after the warm-up (peak of the timed steps minus RSS then);
it reads low when the allocator keeps the warm-up's freed memory. Medians over repetitions.
Goals: packed peak growth <= 1.15x the SFT step's; vs trl, packed step time <= 0.9x and peak growth
<= trl's. Packed vs padded (real tokens/s) and precomputed vs live reference are information.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch
from bench_common import (
    SFT_ADAPTER,
    MiniftSFT,
    add_model_argument,
    add_precision_argument,
    build_sft_model,
    load_line,
    load_recipe,
    minift_sft_model,
    model_name,
    model_spec,
    oracles,
    precision,
    reset_peak_rss,
    rss_mib,
    run_worker,
    set_model,
    set_precision,
    verdict,
)

PAIRS_PER_STEP, PROMPT, ANSWER = 4, 128, (64, 256)
ROW = 512  # packed row length; chosen and rejected are separate documents, each <= PROMPT + 256 = 384
BETA, LR, MAX_GRAD_NORM = 0.1, 1e-4, 1.0
EOS, PAD = 2, 0  # the tiny tokenizer's <|im_end|> and <|endoftext|> (trl pads with the latter)
SIDES = ("packed", "padded", "precomputed", "sft", "trl")


def make_pairs(n: int, vocab: int, seed: int = 0) -> list[dict]:
    """``n`` pairs laid out as ``encode_preferences`` returns them (plus ``index``), the same on every side."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        prompt = [rng.randrange(3, vocab) for _ in range(PROMPT)]
        pair = {"index": i}
        for side in ("chosen", "rejected"):
            answer = [rng.randrange(3, vocab) for _ in range(rng.randint(*ANSWER) - 1)] + [EOS]
            pair[f"{side}_input_ids"] = prompt + answer
            pair[f"{side}_labels"] = [-100] * PROMPT + answer
        pairs.append(pair)
    return pairs


def step_batches(args: argparse.Namespace) -> list[list[dict]]:
    pairs = make_pairs(PAIRS_PER_STEP * (args.warmup + args.steps), model_spec()["vocab_size"])
    return [pairs[i:i + PAIRS_PER_STEP] for i in range(0, len(pairs), PAIRS_PER_STEP)]


def real_tokens(batch_pairs: list[dict]) -> int:
    return sum(len(p["chosen_input_ids"]) + len(p["rejected_input_ids"]) for p in batch_pairs)


class Memory:
    """Peak-RSS bookkeeping: ``start`` at set-up end, ``warmed`` after the warm-up, ``end`` after the last step."""

    def start(self) -> None:
        self.setup = reset_peak_rss()

    def warmed(self) -> None:
        self.warm_peak = rss_mib("VmHWM")
        self.timed_base = reset_peak_rss()

    def end(self) -> dict:
        peak = rss_mib("VmHWM")
        return {"growth": max(self.warm_peak, peak) - self.setup, "timed_growth": peak - self.timed_base,
                "setup_mib": self.setup}


def run_minift(side: str, args: argparse.Namespace) -> dict:
    """One minift side: warm-up steps, then ``args.steps`` timed ones of recipes/dpo.py's ``dpo_step`` (or
    recipes/sft.py's ``sft_step``), each followed by clipping and AdamW; times, tokens, losses, memory."""
    from minift.constants import DEFAULT_ADAPTER
    from minift.data.packing import collate_flat, pack_examples
    from minift.train.forward import SequenceLogprobs
    from minift.train.pairs import PreferenceLoss, Reference, collate_pairs

    steps = step_batches(args)
    sft = MiniftSFT(minift_sft_model(model_spec()))  # model, trainable params, AdamW(lr 1e-4, no weight decay)
    model, params, optimizer, accelerator = sft.model, sft.params, sft.optimizer, sft.accelerator
    logps_model = SequenceLogprobs(model)
    reference = Reference(logps_model, DEFAULT_ADAPTER)
    wrapped = accelerator.prepare(logps_model)  # as the stage prepares it: bf16 autocast when PRECISION is bf16
    loss_fn, dpo_step = PreferenceLoss("sigmoid", beta=BETA), load_recipe("dpo").dpo_step

    def collate(batch_pairs: list[dict]) -> dict:
        return collate_pairs(batch_pairs, PAD, packing=side != "padded", max_seq_length=ROW)

    info = {}
    if side == "precomputed":
        import tempfile
        from pathlib import Path

        torch.set_num_threads(args.threads)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            reference.precompute(accelerator, {"train": steps}, collate, Path(tmp) / "ref.safetensors", "bench")
            info["precompute_s"] = time.perf_counter() - start

    def step(batch_pairs: list[dict]) -> tuple[float, int]:
        if side == "sft":
            docs = [{"input_ids": p[f"{s}_input_ids"], "labels": p[f"{s}_labels"]}
                    for p in batch_pairs for s in ("chosen", "rejected")]
            batch = collate_flat(pack_examples(docs, ROW)[0])
            return sft.step(batch), batch["input_ids"].numel()
        batch = collate(batch_pairs)
        record = dpo_step(accelerator, wrapped, reference, loss_fn, [batch], len(batch_pairs))
        accelerator.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return record["loss"], batch["input_ids"].numel()

    memory, times, cpu, cells, losses = Memory(), [], [], [], []
    memory.start()
    for i, batch_pairs in enumerate(steps):
        if i == args.warmup:
            memory.warmed()
        start, start_cpu = time.perf_counter(), time.process_time()
        loss, n = step(batch_pairs)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        cells.append(n)
        losses.append(loss)
    w = args.warmup
    return {"times": times[w:], "cpu": cpu[w:], "cells": cells[w:], "tokens": [real_tokens(b) for b in steps[w:]],
            "losses": losses, "trainable": sum(p.numel() for p in params), **memory.end(), **info}


def run_trl(args: argparse.Namespace) -> dict:
    """trl's DPOTrainer + peft on the same pairs, in order; per-step times from a callback."""
    import shutil
    import tempfile

    import transformers as tf
    from datasets import Dataset

    from minift.model.load import tiny_model_dir
    from minift.train.pairs import collate_pairs

    refs = oracles()
    DPOConfig, DPOTrainer = refs.trl_dpo()
    steps = step_batches(args)
    pairs = [p for b in steps for p in b]
    dataset = Dataset.from_dict({"prompt_ids": [p["chosen_input_ids"][:PROMPT] for p in pairs],
                                 "chosen_ids": [p["chosen_input_ids"][PROMPT:] for p in pairs],
                                 "rejected_ids": [p["rejected_input_ids"][PROMPT:] for p in pairs]})
    memory, ends, cpu_ends, cells, losses = Memory(), [], [], [], []

    class Timer(tf.TrainerCallback):
        def on_train_begin(self, *a, **k):
            memory.start()
            if args.warmup == 0:
                memory.warmed()
            ends.append(time.perf_counter())
            cpu_ends.append(time.process_time())

        def on_step_end(self, args_, state, *a, **k):
            ends.append(time.perf_counter())
            cpu_ends.append(time.process_time())
            if state.global_step == args.warmup:
                memory.warmed()

    class PretokenizedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, *a, **k):
            return dataset  # already the prompt_ids / chosen_ids / rejected_ids the collator reads

        def training_step(self, model, inputs, num_items_in_batch=None):
            expected = collate_pairs(steps[len(cells)], PAD, packing=False, max_seq_length=ROW)
            if not torch.equal(inputs["input_ids"].cpu(), expected["input_ids"]) or not torch.equal(
                    inputs["completion_mask"].cpu().bool(), expected["labels"] != -100):
                raise RuntimeError(f"trl's batch {len(cells)} differs from minift's padded batch")
            cells.append(inputs["input_ids"].numel())
            loss = super().training_step(model, inputs, num_items_in_batch)
            losses.append(float(loss))
            return loss

    output_dir = tempfile.mkdtemp(prefix="minift-bench-dpo-")
    config = DPOConfig(output_dir=output_dir, report_to="none", save_strategy="no", disable_tqdm=True,
                       num_train_epochs=1, per_device_train_batch_size=PAIRS_PER_STEP, learning_rate=LR,
                       lr_scheduler_type="constant", weight_decay=0.0, optim="adamw_torch",
                       max_grad_norm=MAX_GRAD_NORM, beta=BETA, loss_type=["sigmoid"], max_length=None,
                       bf16=precision() == "bf16",
                       use_cpu=True, gradient_checkpointing=False, train_sampling_strategy="sequential", seed=0)
    peft_config = refs.peft_lora_config(**SFT_ADAPTER, task_type="CAUSAL_LM")
    trainer = PretokenizedDPOTrainer(model=build_sft_model(model_spec()), args=config, train_dataset=dataset,
                                     processing_class=tf.AutoTokenizer.from_pretrained(tiny_model_dir()),
                                     peft_config=peft_config, callbacks=[Timer()])
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    torch.set_num_threads(args.threads)  # in case anything above changed it
    try:
        trainer.train()
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)
    times = [b - a for a, b in zip(ends, ends[1:])]
    if len(times) != len(steps):
        raise RuntimeError(f"trl ran {len(times)} steps, expected {len(steps)}")
    w = args.warmup
    cpu = [b - a for a, b in zip(cpu_ends, cpu_ends[1:])]
    return {"times": times[w:], "cpu": cpu[w:], "cells": cells[w:], "tokens": [real_tokens(b) for b in steps[w:]],
            "losses": losses, "trainable": sum(p.numel() for p in trainable), **memory.end(),
            "info": f"trl {refs.trl_version()}: DPOTrainer, peft LoraConfig {SFT_ADAPTER}, LoRA weights "
                    f"{trainable[0].dtype}, base {next(trainer.model.parameters()).dtype}, bf16={config.bf16}, "
                    f"gradient_checkpointing={config.gradient_checkpointing}, padding_free={trainer.padding_free}, "
                    f"optim {config.optim}, threads {torch.get_num_threads()}"}


def run(args: argparse.Namespace) -> bool:
    """DPO step of model A: minift packed / padded / precomputed vs an SFT step and trl's DPOTrainer + peft."""
    torch.set_num_threads(args.threads)
    set_precision(args.precision)
    set_model(args.model)
    if args._worker:
        result = run_trl(args) if args._worker == "trl" else run_minift(args._worker, args)
        print("RESULT " + json.dumps(result))
        return True
    sides = [s for s in SIDES if s != "trl" or oracles() is not None]
    compute = "fp32 A/B, bf16 base, bf16 autocast" if precision() == "bf16" else "fp32"
    print(f"{model_name()}, LoRA r16 alpha 32 all-linear ({compute}); {PAIRS_PER_STEP} pairs per "
          f"step: prompt {PROMPT}, answers {ANSWER[0]}-{ANSWER[1]} tokens; sigmoid DPO beta {BETA}, clip "
          f"{MAX_GRAD_NORM}, AdamW lr {LR}; packed rows of {ROW}")
    print(f"each side a fresh process with {args.threads} threads: {args.warmup} warm-up + {args.steps} timed "
          f"steps; {args.reps} repetitions, order A B B A; {load_line()}")
    results: dict[str, list[dict]] = {s: [] for s in sides}
    started = time.perf_counter()
    for rep in range(args.reps):
        for side in (sides if rep % 2 == 0 else sides[::-1]):
            r = run_worker(side, args, case="dpo")
            results[side].append(r)
            print(f"  rep {rep + 1} {side:<12} median step {statistics.median(r['times']):5.2f} s (cpu "
                  f"{statistics.median(r['cpu']):5.2f} s), peak growth {r['growth']:5.0f} MiB (timed "
                  f"{r['timed_growth']:.0f}), losses {' '.join(f'{x:.4f}' for x in r['losses'])}", flush=True)
    print(f"\n{'side':<12}{'loss 1st':>9}{'s/step':>8}{'best s':>7}{'cpu s':>7}{'pairs/s':>8}{'real tok/s':>11}"
          f"{'cells/step':>11}{'padding':>8}{'set-up MiB':>11}{'peak growth MiB':>16}{'timed growth':>13}")
    summary = {}
    for side, runs in results.items():
        times = [t for r in runs for t in r["times"]]
        step_s, cpu_s = statistics.median(times), statistics.median(c for r in runs for c in r["cpu"])
        tps = statistics.median(sum(r["tokens"]) / sum(r["times"]) for r in runs)
        growth = statistics.median(r["growth"] for r in runs)
        summary[side] = {"step": step_s, "best": min(times), "cpu": cpu_s, "tps": tps, "growth": growth}
        cells = statistics.median(c for r in runs for c in r["cells"])
        pad = 1 - sum(sum(r["tokens"]) for r in runs) / sum(sum(r["cells"]) for r in runs)
        print(f"{side:<12}{runs[0]['losses'][0]:>9.4f}{step_s:>8.2f}{min(times):>7.2f}{cpu_s:>7.2f}"
              f"{PAIRS_PER_STEP / step_s:>8.2f}{tps:>11.0f}{cells:>11.0f}{pad:>8.1%}"
              f"{statistics.median(r['setup_mib'] for r in runs):>11.0f}{growth:>16.0f}"
              f"{statistics.median(r['timed_growth'] for r in runs):>13.0f}")
    print("(s/step: median wall time over all timed steps; best s: the fastest; cpu s: median process CPU time, "
          "all threads; real tok/s: median over repetitions)")
    trainable = ", ".join(f"{side} {runs[0]['trainable']:,}" for side, runs in results.items())
    print(f"trainable parameters: {trainable}")
    if "precomputed" in results:
        pre = statistics.median(r["precompute_s"] for r in results["precomputed"])
        n_pairs = PAIRS_PER_STEP * (args.warmup + args.steps)
        print(f"precomputed reference: Reference.precompute over {n_pairs} pairs took {pre:.1f} s "
              f"({pre / (args.warmup + args.steps):.2f} s per step's pairs), once before training, not in the steps")
    if "trl" in results:
        print(results["trl"][0]["info"])
    print(f"all sides: {time.perf_counter() - started:.0f} s; {load_line()}")

    def ratios(a: str, b: str) -> str:
        x, y = summary[a], summary[b]
        return (f"median {x['step']:.2f} vs {y['step']:.2f} s; best {x['best'] / y['best']:.2f}x, "
                f"cpu {x['cpu'] / y['cpu']:.2f}x")

    packed, sft = summary["packed"], summary["sft"]
    mem = packed["growth"] / sft["growth"]
    ok = mem <= 1.15
    print(f"\npeak growth DPO (packed, disabled-adapter reference) / SFT step on the same sequences = {mem:.2f}x "
          f"({packed['growth']:.0f} vs {sft['growth']:.0f} MiB; goal <= 1.15x): {verdict(mem <= 1.15)}")
    if "trl" in summary:
        trl = summary["trl"]
        speed, mem_ok = packed["step"] / trl["step"], packed["growth"] <= trl["growth"]
        ok = ok and speed <= 0.9 and mem_ok
        print(f"step time minift (packed) / trl DPOTrainer = {speed:.2f}x ({ratios('packed', 'trl')}; goal <= 0.9x "
              f"on the medians): {verdict(speed <= 0.9)}")
        print(f"peak growth minift (packed) / trl DPOTrainer = {packed['growth'] / trl['growth']:.2f}x "
              f"({packed['growth']:.0f} vs {trl['growth']:.0f} MiB; goal <= 1.0x): {verdict(mem_ok)}")
        print(f"(information) step time minift padded / trl = {summary['padded']['step'] / trl['step']:.2f}x "
              f"({ratios('padded', 'trl')})")
    else:
        ok = False
        print("trl / peft not installed: no comparison with DPOTrainer (counted as FAIL)")
    print(f"(information) real tokens/s packed / padded = {packed['tps'] / summary['padded']['tps']:.2f}x "
          f"(step time {ratios('packed', 'padded')})")
    print(f"(information) step time precomputed / disabled-adapter reference (both packed) = "
          f"{summary['precomputed']['step'] / packed['step']:.2f}x ({ratios('precomputed', 'packed')})")
    return ok


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=6, help="timed steps per process (default 6)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument("--reps", type=int, default=2, help="processes per side, order A B B A (default 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every process (default 2)")
    add_precision_argument(parser)
    add_model_argument(parser)
    parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
