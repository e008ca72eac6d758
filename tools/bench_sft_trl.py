"""The ``trl`` part of ``tools/bench.py sft``: one epoch over the same ragged sequences, minift against trl's
SFTTrainer + peft (from ``tests/oracles.py``) with trl's defaults and matched to minift, each side in fresh
processes."""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch
from bench_common import (
    SFT_ADAPTER,
    SFT_LR,
    SFT_RAGGED_PER_STEP,
    SFT_SEQ,
    MiniftSFT,
    build_sft_model,
    minift_sft_model,
    model_name,
    model_spec,
    oracles,
    precision,
    ragged_examples,
    reset_peak_rss,
    rss_mib,
    run_worker,
    verdict,
)

SFT_TRL_ROWS = 3  # packed rows of 512 per step (~ the real tokens of 8 ragged sequences)


TRL_SIDES = {  # name shown -> worker role
    "minift": "trl-minift",
    "trl defaults": "trl-defaults",
    "trl matched": "trl-matched",
}


def trl_dataset_size(steps: int, warmup: int) -> int:
    """Sequences in the trl part's dataset: one epoch of trl's default batch (8 sequences) per step."""
    return SFT_RAGGED_PER_STEP * (steps + warmup)


def worker_trl(role: str, args: argparse.Namespace) -> dict:
    """One side of the trl part: one epoch over the same ragged sequences; per-step times and real tokens."""
    examples = ragged_examples(trl_dataset_size(args.steps, args.warmup), model_spec()["vocab_size"], seed=2)
    tokens, ends, losses = [], [], []
    if role == "trl-minift":
        from minift.data.packing import collate_flat, pack_examples

        side = MiniftSFT(minift_sft_model(model_spec()))
        rows, _ = pack_examples(examples, SFT_SEQ)
        before = reset_peak_rss()
        ends.append(time.perf_counter())
        for i in range(0, len(rows), SFT_TRL_ROWS):
            batch = collate_flat(rows[i:i + SFT_TRL_ROWS])
            losses.append(side.step(batch))
            tokens.append(int((batch["doc_index"] >= 0).sum()))
            ends.append(time.perf_counter())
        info = {"optimizer": "torch.optim.AdamW (for-each off, CPU default)", "batch": f"{SFT_TRL_ROWS} packed rows"}
    else:
        import tempfile

        import transformers as tf
        from datasets import Dataset
        refs = oracles()
        SFTConfig, SFTTrainer = refs.trl_sft()

        from minift.model.load import tiny_model_dir

        matched = role == "trl-matched"
        model = build_sft_model(model_spec(), precision() if matched else "fp32")
        tokenizer = tf.AutoTokenizer.from_pretrained(tiny_model_dir())
        dataset = Dataset.from_dict({"input_ids": [e["input_ids"] for e in examples]})
        common = {"output_dir": tempfile.mkdtemp(prefix="minift-bench-trl-"), "report_to": "none",
                  "save_strategy": "no", "disable_tqdm": True, "num_train_epochs": 1, "learning_rate": SFT_LR,
                  "seed": 0, "use_cpu": True}  # bf16 autocast on CPU needs use_cpu
        bf16 = precision() == "bf16"  # trl's default is bf16 autocast: off where the CPU has no bf16 units
        if matched:  # minift's settings: same dtype, no checkpointing, packing (bfd -> padding-free) into 512
            config = SFTConfig(**common, activation_checkpointing=False, packing=True, max_length=SFT_SEQ,
                               per_device_train_batch_size=SFT_TRL_ROWS, bf16=bf16)
        else:  # trl's defaults (bf16 autocast, gradient checkpointing, no packing, batch 8, max_length 1024)
            config = SFTConfig(**common) if bf16 else SFTConfig(**common, bf16=False)

        class Timer(tf.TrainerCallback):
            def on_train_begin(self, *a, **k):
                ends.append(time.perf_counter())

            def on_step_end(self, *a, **k):
                ends.append(time.perf_counter())

        class TimedSFTTrainer(SFTTrainer):
            def training_step(self, model, inputs, num_items_in_batch=None):
                mask = inputs.get("attention_mask")
                tokens.append(int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel()))
                loss = super().training_step(model, inputs, num_items_in_batch)
                losses.append(float(loss))
                return loss

        trainer = TimedSFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                                  peft_config=refs.peft_lora_config(**SFT_ADAPTER, task_type="CAUSAL_LM"),
                                  callbacks=[Timer()])
        info = {"optimizer": config.optim, "batch": f"{config.per_device_train_batch_size} "
                f"{'packed rows' if matched else 'sequences'}", "activation_checkpointing": config.activation_checkpointing,
                "bf16": config.bf16, "packing": config.packing, "padding_free": trainer.padding_free,
                "dtype": str(next(model.parameters()).dtype)}
        torch.set_num_threads(args.threads)  # in case the Trainer changed it
        before = reset_peak_rss()
        trainer.train()
        import shutil

        shutil.rmtree(common["output_dir"], ignore_errors=True)  # save_strategy="no": nothing to keep
    times = [b - a for a, b in itertools.pairwise(ends)]
    if len(times) != len(tokens):
        raise RuntimeError(f"{role}: {len(times)} step times for {len(tokens)} batches")
    return {"times": times[args.warmup:], "tokens": tokens[args.warmup:], "epoch_tokens": sum(tokens),
            "growth_mib": rss_mib("VmHWM") - before,
            "rss_setup_mib": before, "steps": len(times), "mean_loss": statistics.fmean(losses),
            "threads": torch.get_num_threads(), **info}


def bench_sft_trl(args: argparse.Namespace) -> bool:
    """minift vs trl's SFTTrainer + peft, each side in its own process (goals: >= 1.5x defaults, >= 1.0x matched)."""
    if oracles() is None:
        print("\n== sft trl: peft / trl are not installed (pip install -e '.[test]'): no comparison (FAIL) ==")
        return False
    n = trl_dataset_size(args.steps, args.warmup)
    print(f"\n== sft trl: one epoch over the same {n} ragged sequences (log-normal lengths as in 'ragged', "
          f"all tokens trained), {model_name()}, LoRA {SFT_ADAPTER} ==")
    compute = "bf16 base + fp32 LoRA, bf16 autocast" if precision() == "bf16" else "fp32"
    print(f"minift: {compute}, no checkpointing, pack_examples into {SFT_SEQ}, {SFT_TRL_ROWS} rows per step in one "
          f"flat row (collate_flat, document attention), clip 1.0 + AdamW")
    print("trl defaults: SFTConfig() defaults (bf16 autocast, gradient checkpointing, no packing, batch 8), "
          "fp32 model (trl's default dtype)" + ("" if precision() == "bf16" else "; bf16=False (no bf16 units here)"))
    print(f"trl matched: {compute}, no checkpointing, packing=True (bfd, padding-free) into {SFT_SEQ}, "
          f"{SFT_TRL_ROWS} rows per step")
    print(f"each run a fresh process: first {args.warmup} steps untimed, the rest timed (step = end-to-end, data "
          f"included); peak-RSS counter reset just before training; {args.reps} repetitions, sides rotating")
    names = list(TRL_SIDES)
    results: dict[str, list[dict]] = {k: [] for k in names}
    for rep in range(args.reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            results[name].append(run_worker(TRL_SIDES[name], args))
            r = results[name][-1]
            print(f"  rep {rep + 1} {name:<13}{sum(r['tokens']) / sum(r['times']):>8.0f} real tokens/s, "
                  f"{r['steps']} steps, growth {r['growth_mib']:.0f} MiB", flush=True)
    print(f"\n{'side':<14}{'epoch tokens':>13}{'steps':>6}{'tok/step':>9}{'mean loss':>10}{'real tokens/s':>15}"
          f"{'set-up MiB':>12}{'peak growth MiB':>17}{'peak total MiB':>16}")
    summary = {}
    for name in names:
        runs = results[name]
        tps = statistics.median(sum(r["tokens"]) / sum(r["times"]) for r in runs)
        growth = statistics.median(r["growth_mib"] for r in runs)
        total = statistics.median(r["growth_mib"] + r["rss_setup_mib"] for r in runs)
        summary[name] = (tps, growth, total)
        r = runs[0]
        print(f"{name:<14}{r['epoch_tokens']:>13,}{r['steps']:>6}{statistics.fmean(r['tokens']):>9.0f}"
              f"{r['mean_loss']:>10.4f}{tps:>15.0f}"
              f"{statistics.median(x['rss_setup_mib'] for x in runs):>12.0f}{growth:>17.0f}{total:>16.0f}")
    for name in names[1:]:
        r = results[name][0]
        print(f"  {name}: {', '.join(f'{k}={r[k]}' for k in ('dtype', 'bf16', 'activation_checkpointing', 'packing', 'padding_free', 'optimizer', 'batch'))}")
    ok = True
    for name, goal in (("trl defaults", 1.5), ("trl matched", 1.0)):
        speed = summary["minift"][0] / summary[name][0]
        mem_ok = summary["minift"][1] <= summary[name][1]
        ok = ok and speed >= goal and mem_ok
        print(f"\nvs {name}: real tokens/s ratio minift / trl = {speed:.2f}x (goal >= {goal}x): {verdict(speed >= goal)}")
        print(f"vs {name}: peak growth minift {summary['minift'][1]:.0f} MiB vs trl {summary[name][1]:.0f} MiB "
              f"(goal <=): {verdict(mem_ok)}; peak total {summary['minift'][2]:.0f} vs {summary[name][2]:.0f} MiB")
    return ok
