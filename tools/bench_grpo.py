"""The ``grpo`` case of tools/bench.py: rollout speed and one whole GRPO step, minift against transformers / trl.

Model A with LoRA r16 on all 7 projections (minift's ``apply_lora``; peft's for trl), random weights, a
word-level tokenizer over its 32k ids; 4 prompts of 128 random tokens, G = 8 completions each, 128 new tokens,
temperature 1 and no top-k / top-p / min-p, fixed seeds, 2 torch threads, every side in fresh processes.

- ``rollout``: minift's sampling engine (``minift.train.sampling.sample``, each prompt prefilled once for its 8
  completions) against ``model.generate(num_return_sequences=8)`` on the same model object and prompts, both
  called as the recipes call them (no autocast). New tokens/s over whole calls (goal >= 2.0x), and ms per
  decode step: (a 128-token call - a 1-token call) / 127.
- ``step``: recipes/grpo.py's step (its ``GRPOBatches`` and ``grpo_step``, then clipping and AdamW as the stage
  does them) against trl's GRPOTrainer (``use_vllm`` off, beta 0, one generation per step, gradient
  checkpointing off, bf16 as minift). Wall time per step (goal <= 0.67x) and peak-RSS growth over the steps
  (goal <= trl's), with the share of each step spent generating.

Both sides score completions with the same reward (a CRC of the text mod 7), so advantages are not all 0.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import zlib

import bench_remote
import torch
from bench_common import (
    SFT_ADAPTER,
    SFT_LR,
    SFT_MAX_GRAD_NORM,
    add_model_argument,
    add_precision_argument,
    bench_accelerator,
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
from bench_serve import word_tokenizer

PROMPTS, PROMPT_TOKENS, G, NEW_TOKENS = 4, 128, 8, 128
ROLLOUT_GAIN, STEP_RATIO = 2.0, 0.67
SIDES = {"rollout": ("rollout-minift", "rollout-generate"), "step": ("step-minift", "step-trl")}


def crc_reward(prompts, completions, **_) -> list[float]:
    """A reward both sides can compute that varies between completions: the text's CRC-32 mod 7."""
    return [float(zlib.crc32(c.encode()) % 7) for c in completions]


def prompt_ids(step: int) -> list[list[int]]:
    """The PROMPTS prompts of one step (different each step, the same on every side)."""
    rng = random.Random(step)
    return [[rng.randrange(3, model_spec()["vocab_size"]) for _ in range(PROMPT_TOKENS)] for _ in range(PROMPTS)]


def worker_rollout(role: str, args: argparse.Namespace) -> dict:
    """Timed calls of one sampler: seconds and new tokens of 128-token calls, seconds of 1-token calls."""
    from minift.lora.merge import folded_adapters
    from minift.train.sampling import SamplingParams, sample, stop_token_ids

    model, tokenizer = minift_sft_model(model_spec()).eval(), word_tokenizer(model_spec()["vocab_size"])
    stops = stop_token_ids(model, tokenizer)

    def call(prompts: list[list[int]], new: int) -> int:
        if role == "rollout-minift":
            params = [SamplingParams(max_new_tokens=new, temperature=1.0, seed=i) for i in range(len(prompts))]
            with folded_adapters(model):  # as the rollouts sample
                return sum(len(c.token_ids) for c in sample(model, tokenizer, prompts, params, n=G))
        ids = torch.tensor(prompts)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                 top_k=0, top_p=1.0, max_new_tokens=new, num_return_sequences=G,
                                 pad_token_id=tokenizer.pad_token_id)[:, ids.shape[1]:].tolist()
        return sum(next((i + 1 for i, t in enumerate(row) if t in stops), len(row)) for row in out)

    full, first, tokens = [], [], []
    for i in range(args.warmup + args.steps):
        prompts = prompt_ids(i)
        start = time.perf_counter()
        count = call(prompts, NEW_TOKENS)
        middle = time.perf_counter()
        call(prompts, 1)
        if i >= args.warmup:
            full.append(middle - start)
            first.append(time.perf_counter() - middle)
            tokens.append(count)
    return {"full": full, "first": first, "tokens": tokens}


def worker_step(role: str, args: argparse.Namespace) -> dict:
    """GRPO steps of one side: wall time and generation time per step, peak-RSS growth over the steps."""
    steps, gen_times, ends = args.warmup + args.steps, [], []
    tokenizer = word_tokenizer(model_spec()["vocab_size"])
    if role == "step-minift":
        from minift.train.forward import TokenLogprobs
        from minift.train.rewards import Rewards

        grpo = load_recipe("grpo")
        cfg = grpo.GRPOConfig(num_generations=G, max_completion_length=NEW_TOKENS, beta=0.0, learning_rate=SFT_LR,
                              per_device_train_batch_size=PROMPTS * G)
        model = minift_sft_model(model_spec())
        accelerator, logps_model = bench_accelerator(), TokenLogprobs(model)
        params = [p for p in model.parameters() if p.requires_grad]
        make = grpo.GRPOBatches(cfg, logps_model, tokenizer, Rewards([("crc", crc_reward)]), "default")
        prepared, optimizer = accelerator.prepare(logps_model, torch.optim.AdamW(params, lr=SFT_LR, weight_decay=0.0))
        before = reset_peak_rss()
        ends.append(time.perf_counter())
        for step in range(steps):
            prompts = [{"input_ids": ids, "prompt": "", "fields": {}} for ids in prompt_ids(step)]
            batch = make(prompts, [step * PROMPTS + i for i in range(PROMPTS)], None)
            gen_times.append(make.rollouts.sampling_s - sum(gen_times))
            grpo.grpo_step(accelerator, prepared, cfg, [batch], make.names)
            accelerator.clip_grad_norm_(params, SFT_MAX_GRAD_NORM)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ends.append(time.perf_counter())
        info = "recipes/grpo.py GRPOBatches + grpo_step, clip 1.0, AdamW"
    else:
        import shutil
        import tempfile

        import transformers as tf
        from datasets import Dataset

        refs = oracles()
        GRPOConfig, GRPOTrainer = refs.trl_grpo()
        model = build_sft_model(model_spec(), precision())
        generate = model.generate

        def timed_generate(*a, **k):
            start = time.perf_counter()
            out = generate(*a, **k)
            gen_times.append(time.perf_counter() - start)
            return out

        model.generate = timed_generate  # peft's generate reaches the base model's
        texts = [" ".join(f"w{t}" for t in ids) for step in range(steps) for ids in prompt_ids(step)]
        out_dir = tempfile.mkdtemp(prefix="minift-bench-grpo-")
        config = GRPOConfig(output_dir=out_dir, report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=True,
                            max_steps=steps, per_device_train_batch_size=PROMPTS * G, num_generations=G,
                            max_completion_length=NEW_TOKENS, temperature=1.0, beta=0.0, learning_rate=SFT_LR,
                            gradient_checkpointing=False, bf16=precision() == "bf16", shuffle_dataset=False,
                            max_grad_norm=SFT_MAX_GRAD_NORM, seed=0, logging_steps=1000)

        class Timer(tf.TrainerCallback):
            def on_train_begin(self, *a, **k):
                ends.append(time.perf_counter())

            def on_step_end(self, *a, **k):
                ends.append(time.perf_counter())

        trainer = GRPOTrainer(model=model, reward_funcs=[crc_reward], args=config, processing_class=tokenizer,
                              train_dataset=Dataset.from_dict({"prompt": texts}), callbacks=[Timer()],
                              peft_config=refs.peft_lora_config(**SFT_ADAPTER, task_type="CAUSAL_LM"))
        torch.set_num_threads(args.threads)  # in case the Trainer changed it
        before = reset_peak_rss()
        trainer.train()
        shutil.rmtree(out_dir, ignore_errors=True)
        info = f"trl GRPOTrainer {refs.trl_version()}, peft LoRA, optim {config.optim}"
    times = [b - a for a, b in zip(ends, ends[1:])]
    if len(times) != steps or len(gen_times) != steps:
        raise RuntimeError(f"{role}: {len(times)} step times and {len(gen_times)} generation times for {steps} steps")
    return {"times": times[args.warmup:], "generate": gen_times[args.warmup:], "growth_mib": rss_mib("VmHWM") - before,
            "info": info}


def worker(role: str, args: argparse.Namespace) -> dict:
    set_precision(args.precision)
    set_model(args.model)
    torch.set_num_threads(args.threads)
    return (worker_rollout if role.startswith("rollout") else worker_step)(role, args)


def run_sides(part: str, args: argparse.Namespace) -> dict[str, list[dict]]:
    """Each side of ``part`` in ``args.reps`` fresh processes, alternating which goes first."""
    results: dict[str, list[dict]] = {role: [] for role in SIDES[part]}
    for rep in range(args.reps):
        for role in SIDES[part][::1 if rep % 2 == 0 else -1]:
            results[role].append(run_worker(role, args, case="grpo"))
            print(f"  rep {rep + 1} {role} done", flush=True)
    return results


def bench_rollout(args: argparse.Namespace) -> bool:
    print(f"\n== grpo rollout: {PROMPTS} prompts x {PROMPT_TOKENS} tokens, G = {G}, {NEW_TOKENS} new tokens, "
          f"temperature 1, no filters; {args.steps} timed calls per process after {args.warmup} ==")
    results = run_sides("rollout", args)
    rates, decode = {}, {}
    print(f"{'side':<18}{'calls':>6}{'median s':>10}{'new tokens/s':>14}{'1-token call ms':>17}{'ms / decode step':>18}")
    for role, runs in results.items():
        full = [s for r in runs for s in r["full"]]
        first = [s for r in runs for s in r["first"]]
        rates[role] = sum(t for r in runs for t in r["tokens"]) / sum(full)
        decode[role] = (statistics.median(full) - statistics.median(first)) / (NEW_TOKENS - 1) * 1e3
        print(f"{role:<18}{len(full):>6}{statistics.median(full):>10.3f}{rates[role]:>14.0f}"
              f"{statistics.median(first) * 1e3:>17.0f}{decode[role]:>18.1f}")
    gain = rates["rollout-minift"] / rates["rollout-generate"]
    print(f"rollout new tokens/s: minift {gain:.2f}x model.generate (goal >= {ROLLOUT_GAIN}x): "
          f"{verdict(gain >= ROLLOUT_GAIN)}; decode step {decode['rollout-minift']:.1f} vs "
          f"{decode['rollout-generate']:.1f} ms")
    return gain >= ROLLOUT_GAIN


def bench_step(args: argparse.Namespace) -> bool:
    if oracles() is None:
        print("\n== grpo step: peft / trl are not installed (pip install -e '.[test]'): no comparison (FAIL) ==")
        return False
    print(f"\n== grpo step: generation + log-probs + update of {PROMPTS} prompts x {G} completions of {NEW_TOKENS} "
          f"tokens, LoRA {SFT_ADAPTER}, beta 0; {args.steps} timed steps per process after {args.warmup} ==")
    results = run_sides("step", args)
    summary = {}
    print(f"{'side':<13}{'steps':>6}{'median step s':>15}{'generating':>12}{'peak growth MiB':>17}")
    for role, runs in results.items():
        times = [t for r in runs for t in r["times"]]
        share = sum(g for r in runs for g in r["generate"]) / sum(times)
        growth = statistics.median(r["growth_mib"] for r in runs)
        summary[role] = (statistics.median(times), growth)
        print(f"{role:<13}{len(times):>6}{summary[role][0]:>15.2f}{share:>11.0%}{growth:>17.0f}   {runs[0]['info']}")
    ratio = summary["step-minift"][0] / summary["step-trl"][0]
    mem_ok = summary["step-minift"][1] <= summary["step-trl"][1]
    print(f"GRPO step time: minift {ratio:.2f}x trl's GRPOTrainer (goal <= {STEP_RATIO}x): {verdict(ratio <= STEP_RATIO)}")
    print(f"peak RSS growth: minift {summary['step-minift'][1]:.0f} MiB vs trl {summary['step-trl'][1]:.0f} MiB "
          f"(goal <=): {verdict(mem_ok)}")
    return ratio <= STEP_RATIO and mem_ok


def run(args: argparse.Namespace) -> bool:
    """GRPO: rollout new tokens/s against model.generate (goal >= 2.0x) and a whole GRPO step against trl's
    GRPOTrainer (goal <= 0.67x time, peak RSS growth <= trl's)."""
    if args._worker:
        import json

        print("RESULT " + json.dumps(worker(args._worker, args)))
        return True
    if args.rollout_backend == "server":
        args.steps = args.steps or 60
        return bench_remote.run(args)
    args.steps = args.steps or 3
    set_precision(args.precision)
    set_model(args.model)
    print(f"{model_name()} {model_spec()}, {precision()}, {args.threads} torch threads per process; {load_line()}")
    ok = True
    if args.part in ("rollout", "all"):
        ok = bench_rollout(args) and ok
    if args.part in ("step", "all"):
        ok = bench_step(args) and ok
    return ok


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--part", choices=("rollout", "step", "all"), default="all")
    parser.add_argument("--steps", type=int, default=None, help="timed calls / steps per process (default 3; 60 "
                                                                  "with --rollout_backend server)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls / steps first (default 1)")
    parser.add_argument("--reps", type=int, default=2, help="fresh processes per side (default 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--rollout_backend", choices=("local", "server"), default="local",
                        help="server: step time of local, server-synchronous and server-async rollouts on the demo "
                             "instead (tools/bench_remote.py; --steps then counts timed steps, default 60)")
    parser.add_argument("--_worker", default="", help=argparse.SUPPRESS)
    add_precision_argument(parser)
    add_model_argument(parser)
