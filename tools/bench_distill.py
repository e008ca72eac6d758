"""A logit-distillation step on model A: minift's chunked step against the naive full-logits step, and the size of
a top-k teacher file against dense logits.

    python tools/bench.py distill [--steps 4] [--warmup 1] [--reps 2] [--threads 2]

Student: model A (random Llama, hidden 512, 8 layers, vocab 32k) with LoRA r16 all-linear (fp32 A/B); teacher:
model A with 16 layers, frozen; both bf16 with bf16 autocast where the CPU multiplies bf16 natively, else fp32
(``--precision``). A step: 4 x 512 tokens (random ids, the first 128 of each row a prompt: 1,532 trained
positions), the teacher's forward (no grad), the student's, forward KL over the trained positions (mean),
backward, clipping 1.0, AdamW.

Sides, each alone in a fresh process, ``--reps`` times in A B B A order:
- ``minift``: recipes/distill.py's step: the teacher's final hidden states at the trained positions only, then
  ``DistillLoss`` (``chunked_distill_loss`` through both heads, 64 positions a chunk, the gradient taken in the
  forward) through recipes/sft.py's ``sft_step``;
- ``naive``: ``model(...).logits`` of both models (``(4, 512, 32000)`` each), the trained positions selected,
  ``distill_divergence`` on them, backward through the student's logits;
- ``sft``: the student's cross-entropy step on the same tokens (``CausalLMLoss``, no teacher): the memory every KD
  step needs for the student's own activations, shown so that each side's extra memory reads off the table.

Peak growth: peak RSS (VmHWM) over the steps minus RSS after set-up; step time: median wall time of the timed
steps. Goals: minift's peak growth <= 0.5x naive's at >= 1.0x its speed. The top-k file: ``TopKCache`` for the
same 4 rows with k = 20 against the bytes of their dense fp16 logits at the trained positions (goal <= 1/100).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_common import (
    SFT_MODEL,
    add_precision_argument,
    autocast,
    build_sft_model,
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

ROWS, SEQ, PROMPT, TOP_K, LR = 4, 512, 128, 20, 1e-4
TEACHER = {**SFT_MODEL, "num_hidden_layers": 2 * SFT_MODEL["num_hidden_layers"]}
SIDES = ("minift", "naive", "sft")


def make_batches(n: int) -> list[dict]:
    """``n`` padded batches of ROWS x SEQ random ids, the first PROMPT of each row untrained."""
    rng = random.Random(0)
    out = []
    for _ in range(n):
        ids = torch.tensor([[rng.randrange(3, SFT_MODEL["vocab_size"]) for _ in range(SEQ)] for _ in range(ROWS)])
        labels = ids.clone()
        labels[:, :PROMPT] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def run_side(side: str, args: argparse.Namespace) -> dict:
    from bench_common import bench_accelerator

    from minift.losses import distill_divergence
    from minift.train.forward import CausalLMLoss, DistillLoss
    from minift.train.teacher import Teacher

    accelerator = bench_accelerator()
    student = minift_sft_model(SFT_MODEL)
    teacher_model = build_sft_model(TEACHER, seed=1).eval().requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    teacher = Teacher(teacher_model, autocast)
    batches = make_batches(args.warmup + args.steps)
    if side in ("minift", "sft"):
        loss_model = CausalLMLoss(student) if side == "sft" else \
            DistillLoss(student, teacher.head, beta=0.0, temperature=1.0, vocab_size=SFT_MODEL["vocab_size"])
        wrapped, optimizer = accelerator.prepare(loss_model, optimizer)
        sft_step = load_recipe("sft").sft_step

        def step(batch: dict) -> float:
            loss, _ = sft_step(accelerator, wrapped, [batch if side == "sft" else {**batch, **teacher(batch)}])
            return loss
    else:
        def step(batch: dict) -> float:
            mask = batch["labels"][:, 1:] != -100
            with torch.no_grad(), autocast():
                t = teacher_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            with autocast():
                s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = distill_divergence(s[:, :-1][mask], t[:, :-1][mask], beta=0.0).mean()
            loss.backward()
            return loss.item()

    torch.set_num_threads(args.threads)
    times, losses = [], []
    setup = reset_peak_rss()
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        losses.append(step(batch))
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return {"times": times, "losses": losses, "growth": rss_mib("VmHWM") - setup, "setup_mib": setup}


def cache_bytes() -> tuple[int, int, int]:
    """(top-k file bytes, dense fp16 logits bytes, trained positions) for the benchmark's 4 rows."""
    from bench_common import bench_accelerator

    from minift.data.packing import collate_padded
    from minift.train.teacher import Teacher, TopKCache, teacher_key

    model = build_sft_model(TEACHER, seed=1).eval().requires_grad_(False)
    rows = [{"input_ids": b["input_ids"][0].tolist(), "labels": b["labels"][0].tolist()} for b in make_batches(ROWS)]
    accelerator = bench_accelerator()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "top.safetensors"
        key = teacher_key({"train": rows}, teacher=None, adapters=[], dtype=precision(), k=TOP_K)
        TopKCache.load_or_compute(path, key, accelerator, Teacher(model, autocast), {"train": rows},
                                  lambda r: collate_padded(r, 0), TOP_K, SFT_MODEL["vocab_size"], ROWS)
        size = path.stat().st_size
    positions = sum(sum(label != -100 for label in r["labels"][1:]) for r in rows)
    return size, positions * SFT_MODEL["vocab_size"] * 2, positions


def run(args: argparse.Namespace) -> bool:
    """Logit distillation of model A from a 16-layer teacher: chunked vs naive full logits (goals <= 0.5x peak memory
    at >= 1.0x speed), top-k file size (goal <= 1/100 of dense fp16 logits)."""
    torch.set_num_threads(args.threads)
    set_precision(args.precision)
    if args._worker:
        print("RESULT " + json.dumps(run_side(args._worker, args)))
        return True
    print(f"student model A + LoRA r16, teacher model A with {TEACHER['num_hidden_layers']} layers ({precision()}); "
          f"{ROWS} x {SEQ} tokens a step ({PROMPT} prompt each); forward KL; {args.warmup} warm-up + {args.steps} "
          f"timed steps, {args.reps} processes per side, {args.threads} threads; {load_line()}")
    results: dict[str, list[dict]] = {s: [] for s in SIDES}
    for rep in range(args.reps):
        for side in (SIDES if rep % 2 == 0 else SIDES[::-1]):
            r = run_worker(side, args, case="distill")
            results[side].append(r)
            print(f"  rep {rep + 1} {side:<7} median step {statistics.median(r['times']):6.2f} s, peak growth "
                  f"{r['growth']:6.0f} MiB, losses {' '.join(f'{x:.4f}' for x in r['losses'])}", flush=True)
    step = {s: statistics.median(t for r in runs for t in r["times"]) for s, runs in results.items()}
    growth = {s: statistics.median(r["growth"] for r in runs) for s, runs in results.items()}
    memory, speed = growth["minift"] / growth["naive"], step["naive"] / step["minift"]
    size, dense, positions = cache_bytes()
    print(f"\n{'side':<8}{'s/step':>8}{'peak growth MiB':>17}{'over sft MiB':>14}")
    for side in SIDES:
        print(f"{side:<8}{step[side]:>8.2f}{growth[side]:>17.0f}{growth[side] - growth['sft']:>14.0f}")
    print(f"\npeak growth minift / naive = {memory:.2f}x (goal <= 0.5x): {verdict(memory <= 0.5)}; the distillation's "
          f"own memory (over the student's cross-entropy step) {growth['minift'] - growth['sft']:.0f} vs "
          f"{growth['naive'] - growth['sft']:.0f} MiB")
    print(f"speed minift / naive = {speed:.2f}x (step {step['minift']:.2f} vs {step['naive']:.2f} s; goal >= 1.0x): "
          f"{verdict(speed >= 1.0)}")
    print(f"top-{TOP_K} teacher file: {size:,} bytes for {positions:,} positions vs {dense:,} bytes of dense fp16 "
          f"logits = 1/{dense / size:.0f} (goal <= 1/100): {verdict(size * 100 <= dense)}")
    return memory <= 0.5 and speed >= 1.0 and size * 100 <= dense


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=4, help="timed steps per process (default 4)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument("--reps", type=int, default=2, help="processes per side, order A B B A (default 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every process (default 2)")
    add_precision_argument(parser)
    parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
