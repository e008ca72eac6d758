"""The ``ppo`` case of tools/bench.py: one whole PPO step against one whole GRPO step on the same rollouts.

    python tools/bench.py ppo [--steps 3] [--warmup 1] [--reps 2] [--threads 2]

The GRPO benchmark's set-up (tools/bench_grpo.py): model A with LoRA r16 on all 7 projections, random weights,
4 prompts of 128 random tokens, 8 completions each of 128 new tokens at temperature 1 (each prompt prefilled once),
the CRC reward, 2 torch threads, every side in fresh processes. Sides:

- ``grpo``: recipes/grpo.py's ``GRPOBatches`` + ``grpo_step`` (beta 0: no reference pass);
- ``ppo-adapter``: recipes/ppo.py's ``PPOBatches`` + ``ppo_step`` with the same sampling (8 completions of each
  prompt), one PPO epoch in one minibatch, the value function a second adapter + head: per step the rollout, the
  policy, value and reference passes on the rollout (no grad), and the update's policy + value forward and
  backward;
- ``ppo-shared``: the same with the value head on the policy's hidden states (``--value_model shared``).

Each step is followed by clipping and AdamW. Goals: the PPO step <= 1.5x the GRPO step's wall time and <= 1.2x
its peak-RSS growth (the adapter value function; the shared one is information).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from bench_common import (
    SFT_ADAPTER,
    SFT_LR,
    SFT_MAX_GRAD_NORM,
    SFT_MODEL,
    add_precision_argument,
    bench_accelerator,
    load_line,
    load_recipe,
    minift_sft_model,
    precision,
    reset_peak_rss,
    rss_mib,
    run_worker,
    set_precision,
    verdict,
)
from bench_grpo import NEW_TOKENS, PROMPTS, G, crc_reward, prompt_ids
from bench_serve import word_tokenizer

SIDES = ("grpo", "ppo-adapter", "ppo-shared")
TIME_RATIO, MEMORY_RATIO = 1.5, 1.2


def worker(role: str, args: argparse.Namespace) -> dict:
    """Steps of one side: wall time and generation time per step, peak-RSS growth over the steps."""
    from minift.lora.config import LoraConfig
    from minift.train.checkpoints import Weights
    from minift.train.forward import TokenLogprobs
    from minift.train.rewards import Rewards
    from minift.train.value import add_value_function

    set_precision(args.precision)
    torch.set_num_threads(args.threads)
    tokenizer, rewards = word_tokenizer(SFT_MODEL["vocab_size"]), Rewards([("crc", crc_reward)])
    model = minift_sft_model(SFT_MODEL)
    accelerator = bench_accelerator()
    if role == "grpo":
        grpo = load_recipe("grpo")
        cfg = grpo.GRPOConfig(num_generations=G, max_completion_length=NEW_TOKENS, beta=0.0, learning_rate=SFT_LR,
                              per_device_train_batch_size=PROMPTS * G)
        wrapper = TokenLogprobs(model)
        make = grpo.GRPOBatches(cfg, wrapper, tokenizer, rewards, "default")

        def update(batch: dict, step: int) -> None:
            grpo.grpo_step(accelerator, prepared, cfg, [batch], make.names)
    else:
        ppo = load_recipe("ppo")
        cfg = ppo.PPOConfig(max_completion_length=NEW_TOKENS, learning_rate=SFT_LR, ppo_epochs=1, num_minibatches=1,
                            per_device_train_batch_size=PROMPTS * G, value_model=role.split("-")[1])
        weights = Weights(model, full=False, base_model="model A", parents=[])
        wrapper = add_value_function(model, weights, LoraConfig(**SFT_ADAPTER) if cfg.value_model == "adapter" else None)
        for param in model.parameters():  # the value adapter's A/B in fp32 too, as the policy's
            if param.requires_grad:
                param.data = param.data.float()
        kl = ppo.AdaptiveKLController(cfg.init_kl_coef)
        make = ppo.PPOBatches(cfg, wrapper, tokenizer, rewards, kl, lambda t: t)
        make.rollouts.G = G  # GRPO's sampling: each prompt prefilled once for its 8 completions

        def update(batch: dict, step: int) -> None:
            ppo.ppo_step(accelerator, prepared, wrapper, cfg, [batch], step, make.names)
    params = [p for p in model.parameters() if p.requires_grad]
    prepared, optimizer = accelerator.prepare(wrapper, torch.optim.AdamW(params, lr=SFT_LR, weight_decay=0.0))
    before = reset_peak_rss()
    ends, gen_times = [time.perf_counter()], []
    for step in range(args.warmup + args.steps):
        prompts = [{"input_ids": p, "prompt": "", "fields": {}} for p in prompt_ids(step)]
        batch = make(prompts, [step * PROMPTS + i for i in range(PROMPTS)], None)
        gen_times.append(make.rollouts.sampling_s - sum(gen_times))
        update(batch, step + 1)
        accelerator.clip_grad_norm_(params, SFT_MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ends.append(time.perf_counter())
    times = [b - a for a, b in zip(ends, ends[1:])]
    return {"times": times[args.warmup:], "generate": gen_times[args.warmup:], "growth_mib": rss_mib("VmHWM") - before,
            "completions": len(batch["input_ids"])}


def run(args: argparse.Namespace) -> bool:
    """A PPO step (value adapter + head, or a shared head) against a GRPO step on the same rollouts: goals <= 1.5x
    the time and <= 1.2x the peak RSS growth."""
    if args._worker:
        print("RESULT " + json.dumps(worker(args._worker, args)))
        return True
    set_precision(args.precision)
    print(f"model A {SFT_MODEL}, random weights, {precision()}, {args.threads} torch threads per process; "
          f"{PROMPTS} prompts x {G} completions of {NEW_TOKENS} tokens a step; {args.steps} timed steps after "
          f"{args.warmup}, {args.reps} processes per side; {load_line()}")
    results: dict[str, list[dict]] = {role: [] for role in SIDES}
    for rep in range(args.reps):
        for role in (SIDES if rep % 2 == 0 else SIDES[::-1]):
            results[role].append(run_worker(role, args, case="ppo"))
            print(f"  rep {rep + 1} {role} done", flush=True)
    summary = {}
    print(f"\n{'side':<13}{'completions':>12}{'median step s':>15}{'generating':>12}{'peak growth MiB':>17}")
    for role, runs in results.items():
        times = [t for r in runs for t in r["times"]]
        share = sum(g for r in runs for g in r["generate"]) / sum(times)
        summary[role] = (statistics.median(times), statistics.median(r["growth_mib"] for r in runs))
        print(f"{role:<13}{runs[0]['completions']:>12}{summary[role][0]:>15.2f}{share:>11.0%}{summary[role][1]:>17.0f}")
    ok = True
    for role in ("ppo-adapter", "ppo-shared"):
        time_ratio = summary[role][0] / summary["grpo"][0]
        memory_ratio = summary[role][1] / summary["grpo"][1]
        goal = role == "ppo-adapter"
        if goal:
            ok = time_ratio <= TIME_RATIO and memory_ratio <= MEMORY_RATIO
        tail = (f": {verdict(time_ratio <= TIME_RATIO)}, {verdict(memory_ratio <= MEMORY_RATIO)}" if goal
                else " (information)")
        print(f"{role} / grpo: step time {time_ratio:.2f}x (goal <= {TIME_RATIO}x), peak RSS growth {memory_ratio:.2f}x "
              f"(goal <= {MEMORY_RATIO}x){tail}")
    return ok


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument("--reps", type=int, default=2, help="fresh processes per side (default 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--_worker", default="", help=argparse.SUPPRESS)
    add_precision_argument(parser)
