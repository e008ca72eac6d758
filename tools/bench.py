"""Benchmarks that time minift against a reference implementation in the same process.

    python tools/bench.py CASE [options] [--strict]

Each case prints the machine, a table of per-side timings and a PASS/FAIL line against its
target. The exit status is 0 unless ``--strict`` is given and the case fails. The machine is
assumed noisy: sides alternate step by step (A B B A ...), ratios are medians of paired steps,
and single-thread CPU time (which other processes cannot inflate) is reported beside wall time.

Cases
-----
lora  ``python tools/bench.py lora [--steps 40] [--warmup 3]``
      One LoRA training step (forward, backward, AdamW step) of a random tiny Llama, fp32 on
      one CPU thread, with minift's ``apply_lora`` against peft's ``get_peft_model`` (skipped
      when peft is not installed). Both sides start from the same base weights and see the same
      token ids; the target is ``minift_time / peft_time <= 1.0`` (CPU time).
data  ``python tools/bench.py data [--records 50000] [--max_seq_length 2048]``
      The SFT data pipeline (format detection, chat template, label masks, packing) on 50k
      synthetic mixed-format records against the tokenizer alone on the texts it produced
      (target <= 1.5x), and packing efficiency on their log-normal length mix (target >= 95%).
sft   ``python tools/bench.py sft [--part dense|ragged|vocab|trl|all] [--steps N] [--warmup N] [--reps N]
      [--threads 2]``
      SFT training steps of model "A" (random Llama: hidden 512, 8 layers, 8/4 heads, MLP 1536, vocab 32k) with
      minift's LoRA (r16, alpha 32, all 7 projections), bf16 autocast on CPU, bf16 frozen base weights with fp32
      LoRA weights (the fp32-weights variant is timed beside it in ``dense``), no gradient checkpointing, loss via
      ``CausalLMLoss``, gradient clipping 1.0 and AdamW; 2 torch threads in every process. Parts:
      ``dense``: 4 x 512 tokens; tokens/s and share of the ceiling set by a 2048^3 bf16 GEMM timed between the
      steps (FLOP count in ``bench_sft_dense``; goal >= 75%). ``ragged``: 8 log-normal-length sequences per step,
      packed (pack_examples + collate_packed, no mask) vs padded (collate_padded + attention_mask), real tokens/s
      (goal >= 1.3x). ``vocab``: hidden 256, vocab 128k, first half of each 2 x 1024 sequence prompt-masked;
      chunked ``CausalLMLoss`` vs HF's full-logits ``model(..., labels=)``, each side in its own processes, peak
      RSS growth (goal <= 0.5x) at equal or better speed. ``trl``: one epoch over the same ragged sequences, each
      side in its own processes (sides rotating): minift vs trl's SFTTrainer + peft with its defaults (goal
      >= 1.5x real tokens/s) and matched (same dtype, no checkpointing, its packing; goal >= 1.0x), and peak RSS
      growth <= trl's. Per-part defaults for steps / warm-up / processes: dense 6/2, ragged 8/2, vocab 2/1/3,
      trl 6/1/2.
dpo   ``python tools/bench.py dpo [--steps 6] [--warmup 1] [--reps 2] [--threads 2]``
      DPO steps of model A (4 pairs, prompt 128, answers 64-256 tokens), each side in fresh processes: minift
      packed / padded / precomputed reference, an SFT step on the same sequences (goal: DPO peak memory <= 1.15x)
      and trl's DPOTrainer + peft (goals: step time <= 0.9x, peak memory <= trl's); see ``tools/bench_dpo.py``.
gguf  ``python tools/bench.py gguf [--reps 3] [--outtypes f16,bf16,q8_0] [--llama_cpp DIR]``
      GGUF export of a 106M-parameter bf16 Llama, each conversion in a fresh process: wall time and peak RSS of
      ``tools/convert_to_gguf.py`` against llama.cpp's ``convert_hf_to_gguf.py`` (goal <= 0.5x both); see
      ``tools/bench_gguf.py``.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import platform
import random
import statistics
import sys
import time
from typing import Callable

import torch
import transformers
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from minift.lora import LoraConfig, apply_lora

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_dpo  # noqa: E402  (sibling files: tools/ is not a package)
import bench_gguf  # noqa: E402

# ----------------------------------------------------------------------------- lora

LORA_MODEL = dict(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
LORA_ADAPTER = dict(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)
BATCH, SEQ_LEN = 8, 256
ADAMW = dict(lr=1e-4, foreach=False, fused=False)  # identical optimizer code path on both sides


def build_tiny_llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(**LORA_MODEL, attn_implementation="sdpa")
    return LlamaForCausalLM(config).float().train()


def wrap_minift(model: nn.Module) -> nn.Module:
    return apply_lora(model, LoraConfig(**LORA_ADAPTER))


def peft_wrapper() -> Callable[[nn.Module], nn.Module] | None:
    """peft's ``get_peft_model`` with the same adapter settings, or None when peft is not installed."""
    try:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model
    except ImportError:
        return None
    return lambda model: get_peft_model(model, PeftLoraConfig(**LORA_ADAPTER))


class TrainingSide:
    """A LoRA-wrapped model and its optimizer; ``step`` runs one training step and records its times."""

    def __init__(self, name: str, model: nn.Module, input_ids: torch.Tensor):
        self.name, self.model, self.input_ids = name, model, input_ids
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, **ADAMW)
        self.wall: list[float] = []  # timed steps only
        self.cpu: list[float] = []  # this thread's CPU time: what other processes on the machine cannot inflate
        self.first_loss: float | None = None

    def step(self, timed: bool = True) -> None:
        wall, cpu = time.perf_counter(), time.thread_time()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.model(self.input_ids, labels=self.input_ids, use_cache=False).loss
        loss.backward()
        self.optimizer.step()
        if timed:
            self.wall.append(time.perf_counter() - wall)
            self.cpu.append(time.thread_time() - cpu)
        if self.first_loss is None:
            self.first_loss = loss.item()


def print_lora_table(sides: list[TrainingSide]) -> None:
    tokens = BATCH * SEQ_LEN
    print(f"{'side':<8}{'trainable':>11}{'first loss':>12}{'wall ms':>10}{'cpu ms':>9}{'tokens/s':>10}")
    for side in sides:
        wall, cpu = statistics.median(side.wall), statistics.median(side.cpu)
        trainable = sum(p.numel() for p in side.params)
        print(f"{side.name:<8}{trainable:>11,}{side.first_loss:>12.4f}{1e3 * wall:>10.1f}{1e3 * cpu:>9.1f}"
              f"{tokens / wall:>10.0f}")


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median of step-by-step ratios: neighbouring steps share the machine's load, so its swings cancel."""
    return statistics.median(x / y for x, y in zip(a, b))


def bench_lora(args: argparse.Namespace) -> bool:
    """LoRA training step: minift vs peft (target: minift_time / peft_time <= 1.0)."""
    wrap_peft = peft_wrapper()
    print(f"model: random Llama {LORA_MODEL}")
    print(f"adapter: {LORA_ADAPTER}; batch {BATCH} x {SEQ_LEN} tokens; fp32; AdamW {ADAMW}")
    print(f"schedule: {args.warmup} warm-up steps per side, then {args.steps} timed steps per side, "
          "sides alternating every step (order flipped each round)")
    base = build_tiny_llama()
    input_ids = torch.randint(LORA_MODEL["vocab_size"], (BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    wrappers = {"minift": wrap_minift, "peft": wrap_peft} if wrap_peft else {"minift": wrap_minift}
    sides = []
    for name, wrap in wrappers.items():
        torch.manual_seed(1)  # same adapter initialisation seed on each side
        sides.append(TrainingSide(name, wrap(copy.deepcopy(base)), input_ids))
    for side in sides:
        for _ in range(args.warmup):
            side.step(timed=False)
    for i in range(args.steps):
        for side in (sides if i % 2 == 0 else sides[::-1]):
            side.step()
    print()
    print_lora_table(sides)
    if wrap_peft is None:
        print("\npeft is not installed: no reference to compare against (counted as PASS)")
        return True
    wall = paired_ratio(sides[0].wall, sides[1].wall)
    cpu = paired_ratio(sides[0].cpu, sides[1].cpu)
    passed = cpu <= 1.0
    print(f"\nratio minift / peft, median of paired steps: wall {wall:.3f}, cpu {cpu:.3f}")
    print(f"ratio (cpu time) = {cpu:.3f} (target <= 1.0): {'PASS' if passed else 'FAIL'}")
    return passed


def add_lora_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=40, help="timed steps per side (default 40)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per side first (default 3)")


# ----------------------------------------------------------------------------- data

DATA_WORDS = ("apple banana cherry grape lemon red blue green cat dog bird fish sun moon star rain tree "
              "rock book cup box key door lamp one two three four five").split()


def synthetic_records(n: int, seed: int) -> list:
    """``n`` records in a round-robin of SFT formats; total lengths log-normal, clamped to ~20..1000 tokens."""
    from minift.data import Record

    rng = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(rng.choice(DATA_WORDS) for _ in range(max(1, k)))

    records = []
    for i in range(n):
        total = min(1000, max(20, int(rng.lognormvariate(5.3, 0.9))))  # tokens, roughly: one per word
        p, c = max(1, total // 3), max(1, total - total // 3 - 12)
        kind = i % 5
        if kind == 0:
            data = {"instruction": words(p // 2), "input": words(p - p // 2), "output": words(c)}
        elif kind == 1:
            data = {"prompt": words(p), "completion": words(c)}
        elif kind == 2:
            half = max(1, c // 2)
            data = {"messages": [{"role": "system", "content": words(4)}, {"role": "user", "content": words(p // 2)},
                                 {"role": "assistant", "content": words(half)}, {"role": "user", "content": words(p // 2)},
                                 {"role": "assistant", "content": words(c - half)}]}
        elif kind == 3:
            data = {"conversations": [{"from": "human", "value": words(p)}, {"from": "gpt", "value": words(c)}]}
        else:
            data = {"text": words(total - 1)}
        records.append(Record(data, f"synthetic:{i}"))
    return records


def bench_data(args: argparse.Namespace) -> bool:
    """Tokenize + mask + pack vs tokenizer alone (target <= 1.5x); packing efficiency (target >= 95%)."""
    from minift.encode import encode_sft
    from minift.formats import normalize_all
    from minift.models import load_model_and_tokenizer
    from minift.packing import pack_examples

    torch.set_num_threads(2)
    _, tokenizer = load_model_and_tokenizer("tiny")
    records = synthetic_records(args.records, seed=0)
    print(f"data: {len(records):,} synthetic records in 5 formats (alpaca, prompt/completion, 2-turn messages, "
          f"ShareGPT, text); tiny tokenizer; rows of {args.max_seq_length} tokens")
    pipeline_times, tokenizer_times = [], []
    for _ in range(args.repeats):  # alternate: pipeline, then the tokenizer alone on the texts it produced
        start = time.perf_counter()
        examples = normalize_all(records, "sft").examples
        encoded, report = encode_sft(examples, tokenizer, max_seq_length=args.max_seq_length)
        rows, stats = pack_examples(encoded, args.max_seq_length)
        pipeline_times.append(time.perf_counter() - start)
        texts = tokenizer.batch_decode([e["input_ids"] for e in encoded])
        start = time.perf_counter()
        tokenizer(texts, add_special_tokens=False)
        tokenizer_times.append(time.perf_counter() - start)
    pipeline, alone = statistics.median(pipeline_times), statistics.median(tokenizer_times)
    ratio = pipeline / alone
    print(f"\nencoded: {report}")
    print(f"packed:  {stats}")
    print(f"\n{'stage':<34}{'median s':>10}{'records/s':>12}")
    print(f"{'tokenizer alone (same texts)':<34}{alone:>10.2f}{len(records) / alone:>12,.0f}")
    print(f"{'normalize + template + mask + pack':<34}{pipeline:>10.2f}{len(records) / pipeline:>12,.0f}")
    ok_ratio, ok_eff = ratio <= 1.5, stats.efficiency >= 0.95
    print(f"\nratio pipeline / tokenizer = {ratio:.2f} (target <= 1.5): {'PASS' if ok_ratio else 'FAIL'}")
    print(f"packing efficiency = {100 * stats.efficiency:.1f}% (target >= 95%): {'PASS' if ok_eff else 'FAIL'}")
    return ok_ratio and ok_eff


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--records", type=int, default=50_000, help="synthetic records (default 50000)")
    parser.add_argument("--max_seq_length", type=int, default=2048, help="packed row length (default 2048)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of each side (default 3)")


# ----------------------------------------------------------------------------- sft

# Benchmark model "A" and its adapter (minift's apply_lora; peft's get_peft_model with the same values for trl).
SFT_MODEL = {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 4,
             "intermediate_size": 1536, "vocab_size": 32000}
SFT_VOCAB_MODEL = {**SFT_MODEL, "hidden_size": 256, "intermediate_size": 768, "vocab_size": 128_000}
SFT_ADAPTER = {"r": 16, "lora_alpha": 32, "target_modules": "all-linear", "lora_dropout": 0.0}
SFT_THREADS = 2  # default of --threads
SFT_LR = 1e-4
SFT_MAX_GRAD_NORM = 1.0  # minift's recipe default (TrainConfig.max_grad_norm) and the Trainer's
SFT_SEQ = 512  # packed row length / dense sequence length
SFT_DENSE_BATCH = 4
SFT_RAGGED_PER_STEP = 8  # sequences per step
SFT_TRL_ROWS = 3  # packed rows of 512 per step (~ the real tokens of 8 ragged sequences)
SFT_LOGNORMAL = (5.0, 0.6, 32, 512)  # mu, sigma, min, max of the ragged lengths
SFT_VOCAB_BATCH = (2, 1024)
SFT_PARTS = ("dense", "ragged", "vocab", "trl")
SFT_WEIGHTS = "bf16"  # frozen base weights bf16 (measured ~6% faster than fp32); LoRA A/B stay fp32 (master)


def build_sft_model(spec: dict, weights: str = SFT_WEIGHTS, seed: int = 0) -> nn.Module:
    """Random Llama from ``spec``: the same weights for a given seed in every process (init in fp32, then cast)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**spec, attn_implementation="sdpa")).train()
    return model.to(torch.bfloat16) if weights == "bf16" else model.float()


def minift_sft_model(spec: dict, weights: str = SFT_WEIGHTS) -> nn.Module:
    """Model A with minift's LoRA on all 7 projections; the trained A/B matrices are fp32 whatever the base dtype."""
    model = apply_lora(build_sft_model(spec, weights), LoraConfig(**SFT_ADAPTER))
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    return model


class MiniftSFT:
    """minift's training step: ``CausalLMLoss`` under bf16 autocast, mean over trained tokens, backward,
    gradient clipping (1.0) and AdamW, as in recipes/sft.py. ``step`` returns the step's mean loss."""

    def __init__(self, model: nn.Module):
        from minift.train import CausalLMLoss

        self.model, self.loss_model = model, CausalLMLoss(model)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=SFT_LR, weight_decay=0.0)

    def step(self, batch: dict) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ce, count = self.loss_model(**batch)
        loss = ce / max(count, 1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, SFT_MAX_GRAD_NORM)
        self.optimizer.step()
        return loss.item()


def base_linear_params(model: nn.Module) -> tuple[int, int]:
    """(weights of the decoder's linear layers, weights of the LM head) of an un-wrapped Llama."""
    head = model.get_output_embeddings()
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and m is not head)
    return linear, head.weight.numel()


def dense_flops_per_token(spec: dict, seq: int) -> tuple[float, int, int]:
    """FLOPs per token of a LoRA step (see bench_sft_dense); also returns (linear params, head params)."""
    with torch.device("meta"):
        linear, head = base_linear_params(LlamaForCausalLM(LlamaConfig(**spec)))
    attention = 12 * spec["num_hidden_layers"] * seq * spec["hidden_size"]
    return 4 * (linear + head) + attention, linear, head


_GEMM_INPUTS: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def bf16_gemm_rate(n: int = 2048, repeats: int = 3) -> float:
    """FLOP/s of an n x n x n bf16 matmul: median of ``repeats`` timings (after one untimed call)."""
    if n not in _GEMM_INPUTS:
        g = torch.Generator().manual_seed(0)
        _GEMM_INPUTS[n] = (torch.randn(n, n, generator=g).bfloat16(), torch.randn(n, n, generator=g).bfloat16())
    a, b = _GEMM_INPUTS[n]
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / statistics.median(times)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def bench_sft_dense(args: argparse.Namespace) -> bool:
    """Dense 4 x 512 LoRA step: tokens/s and share of the bf16 GEMM ceiling (goal >= 75%).

    FLOPs per token = 4 x (decoder linear params + LM-head params) + 12 x layers x seq x hidden:
    2 x params forward plus 2 x params backward for the activation gradients only (the frozen base
    weights need no weight gradient); attention scores and weighted sum 2 x 2 x seq x hidden per layer
    forward over the full (not causal-halved) context, backward 2x that. LoRA's own A/B FLOPs
    (6 x r x (in + out) per projection, ~4% here) and element-wise work are not counted.
    Ceiling tokens/s = bf16 GEMM rate (2048^3 matmul, measured between the steps) / FLOPs per token.
    """
    steps = args.steps
    flops, linear, head = dense_flops_per_token(SFT_MODEL, SFT_SEQ)
    tokens = SFT_DENSE_BATCH * SFT_SEQ
    print(f"\n== sft dense: batch {SFT_DENSE_BATCH} x {SFT_SEQ}, no padding, all tokens trained ==")
    print(f"FLOPs/token = 4 x ({linear:,} linear + {head:,} head) + 12 x {SFT_MODEL['num_hidden_layers']} x {SFT_SEQ}"
          f" x {SFT_MODEL['hidden_size']} = {flops / 1e6:.1f} MFLOP")
    ids = torch.randint(SFT_MODEL["vocab_size"], (SFT_DENSE_BATCH, SFT_SEQ), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    variants = {"bf16 base + fp32 LoRA": MiniftSFT(minift_sft_model(SFT_MODEL, "bf16")),
                "fp32 weights": MiniftSFT(minift_sft_model(SFT_MODEL, "fp32"))}
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    losses: dict[str, float] = {}
    for name in names:
        for _ in range(args.warmup):
            losses.setdefault(name, variants[name].step(batch))
    bf16_gemm_rate()
    rates, shares = [], {n: [] for n in names}
    for i in range(steps):  # each round: a GEMM rate, then one step of each variant (order flipped each round)
        rate = bf16_gemm_rate()
        rates.append(rate)
        for name in (names if i % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            variants[name].step(batch)
            times[name].append(time.perf_counter() - start)
            shares[name].append(tokens / times[name][-1] * flops / rate)
    rate = statistics.median(rates)
    ceiling = rate / flops
    print(f"bf16 GEMM 2048^3: median {rate / 1e9:.0f} GFLOP/s over {len(rates)} rounds "
          f"(min {min(rates) / 1e9:.0f}, max {max(rates) / 1e9:.0f}) -> ceiling {ceiling:,.0f} tokens/s")
    print(f"{steps} timed steps per variant after {args.warmup} warm-up, variants alternating; "
          f"{torch.get_num_threads()} threads\n")
    print(f"{'variant':<24}{'first loss':>11}{'median ms':>11}{'best ms':>9}{'tokens/s':>10}{'GFLOP/s':>9}"
          f"{'share':>8}{'paired share':>14}")
    result = {}
    for name in names:
        wall = statistics.median(times[name])
        tps = tokens / wall
        result[name] = tps / ceiling
        print(f"{name:<24}{losses[name]:>11.4f}{1e3 * wall:>11.0f}{1e3 * min(times[name]):>9.0f}{tps:>10.0f}"
              f"{tps * flops / 1e9:>9.0f}{tps / ceiling:>8.1%}{statistics.median(shares[name]):>14.1%}")
    used = names[0] if SFT_WEIGHTS == "bf16" else names[1]
    share = result[used]
    ratio = statistics.median(b / a for a, b in zip(times[names[0]], times[names[1]]))
    print(f"\nfp32-weights step time / bf16-base step time (median of pairs): {ratio:.2f}; "
          f"the other parts use: {used}")
    print(f"share of the bf16 GEMM ceiling ({used}) = {share:.1%} (goal >= 75%): {verdict(share >= 0.75)}")
    print("(paired share: per round, step tokens/s x FLOPs/token / that round's GEMM rate, median over rounds)")
    return share >= 0.75


def ragged_lengths(n: int, rng: random.Random) -> list[int]:
    mu, sigma, low, high = SFT_LOGNORMAL
    return [min(high, max(low, round(rng.lognormvariate(mu, sigma)))) for _ in range(n)]


def ragged_examples(n: int, vocab: int, seed: int) -> list[dict]:
    """``n`` examples with log-normal lengths and random token ids; every token is trained (labels = ids)."""
    rng = random.Random(seed)
    out = []
    for length in ragged_lengths(n, rng):
        ids = [rng.randrange(vocab) for _ in range(length)]
        out.append({"input_ids": ids, "labels": list(ids)})
    return out


def bench_sft_ragged(args: argparse.Namespace) -> bool:
    """Ragged 8 sequences per step: packed (no mask) vs padded (attention_mask), real tokens/s (goal >= 1.3x)."""
    from minift.packing import collate_packed, collate_padded, pack_examples

    steps = args.steps
    n_steps = steps + args.warmup
    examples = ragged_examples(n_steps * SFT_RAGGED_PER_STEP, SFT_MODEL["vocab_size"], seed=1)
    batches = [examples[i * SFT_RAGGED_PER_STEP:(i + 1) * SFT_RAGGED_PER_STEP] for i in range(n_steps)]
    real = [sum(len(e["input_ids"]) for e in b) for b in batches]
    padded_cells = [SFT_RAGGED_PER_STEP * max(len(e["input_ids"]) for e in b) for b in batches]
    print(f"\n== sft ragged: {SFT_RAGGED_PER_STEP} sequences per step, lengths log-normal(mu {SFT_LOGNORMAL[0]}, "
          f"sigma {SFT_LOGNORMAL[1]}) clamped to {SFT_LOGNORMAL[2]}..{SFT_LOGNORMAL[3]} ==")
    print(f"{n_steps} batches: {sum(real):,} real tokens, padding when padded {1 - sum(real) / sum(padded_cells):.1%}")

    def packed(b: list[dict]) -> dict:
        rows, _ = pack_examples(b, SFT_SEQ)
        return collate_packed(rows, pad_token_id=0)

    def padded(b: list[dict]) -> dict:
        return collate_padded(b, pad_token_id=0)

    base = minift_sft_model(SFT_MODEL)
    sides = {"packed": (packed, MiniftSFT(base)), "padded": (padded, MiniftSFT(copy.deepcopy(base)))}
    names = list(sides)
    times = {n: [] for n in names}
    cells = {n: [] for n in names}
    for i, b in enumerate(batches):  # same batch on both sides, order flipped each step; collation timed too
        for name in (names if i % 2 == 0 else names[::-1]):
            collate, side = sides[name]
            start = time.perf_counter()
            batch = collate(b)
            side.step(batch)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
                cells[name].append(batch["input_ids"].numel())
    timed_real = real[args.warmup:]
    print(f"{steps} timed steps per side after {args.warmup} warm-up; {torch.get_num_threads()} threads; "
          f"{SFT_WEIGHTS} base, bf16 autocast\n")
    print(f"{'side':<8}{'cells/step':>11}{'padding':>9}{'median ms':>11}{'best ms':>9}{'real tokens/s':>15}")
    for name in names:
        pad_share = 1 - sum(timed_real) / sum(cells[name])
        rates = [r / t for r, t in zip(timed_real, times[name])]
        print(f"{name:<8}{statistics.median(cells[name]):>11.0f}{pad_share:>9.1%}"
              f"{1e3 * statistics.median(times[name]):>11.0f}{1e3 * min(times[name]):>9.0f}"
              f"{statistics.median(rates):>15.0f}")
    ratio = paired_ratio(times["padded"], times["packed"])
    print(f"\nreal tokens/s packed / padded (median of paired steps) = {ratio:.2f}x (goal >= 1.3x): "
          f"{verdict(ratio >= 1.3)}")
    return ratio >= 1.3


# -- sub-processes: each side of the vocab and trl parts runs alone in a fresh process

def rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak_rss() -> float:
    """Reset Linux's peak-RSS counter (VmHWM) and return the current RSS in MiB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss_mib("VmRSS")


def run_worker(role: str, args: argparse.Namespace, case: str = "sft") -> dict:
    """Run this file as ``CASE --_worker role`` in a fresh process; return the JSON line it prints."""
    import json
    import subprocess

    cmd = [sys.executable, os.path.abspath(__file__), case, "--_worker", role, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--threads", str(args.threads)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_OFFLINE": "1", "DISABLE_MLFLOW_INTEGRATION": "TRUE", "WANDB_DISABLED": "true"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker {role} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def vocab_batch() -> dict:
    rows, seq = SFT_VOCAB_BATCH
    ids = torch.randint(SFT_VOCAB_MODEL["vocab_size"], (rows, seq), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :seq // 2] = -100  # the prompt half of every sequence is not trained
    return {"input_ids": ids, "labels": labels}


def worker_vocab(role: str, args: argparse.Namespace) -> dict:
    """One side of the vocab part: minift's chunked CausalLMLoss, or HF's full-logits ``model(..., labels=)``."""
    model = minift_sft_model(SFT_VOCAB_MODEL)
    side = MiniftSFT(model)
    batch = vocab_batch()
    if role == "vocab-full":
        def step(b: dict) -> float:
            side.optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=b["input_ids"], labels=b["labels"], use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(side.params, SFT_MAX_GRAD_NORM)
            side.optimizer.step()
            return loss.item()
    else:
        step = side.step
    first_loss = step(batch)  # warm-up step: allocates optimizer state; set-up ends here
    for _ in range(args.warmup - 1):
        step(batch)
    before = reset_peak_rss()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - start)
    return {"times": times, "growth_mib": rss_mib("VmHWM") - before, "rss_setup_mib": before,
            "first_loss": first_loss}


def bench_sft_vocab(args: argparse.Namespace) -> bool:
    """128k vocab, half the tokens prompt-masked: minift chunked vs full logits; peak RSS growth (goal <= 0.5x)."""
    rows, seq = SFT_VOCAB_BATCH
    print(f"\n== sft vocab: hidden {SFT_VOCAB_MODEL['hidden_size']}, intermediate "
          f"{SFT_VOCAB_MODEL['intermediate_size']}, vocab {SFT_VOCAB_MODEL['vocab_size']:,}, batch {rows} x {seq}, "
          f"first half of each sequence labels -100 ==")
    print(f"each side alone in a fresh process, {args.reps} repetitions alternating A B A B; per repetition "
          f"{args.warmup} warm-up step(s) (end of set-up), then the peak-RSS counter is reset and {args.steps} "
          f"timed steps run; growth = peak RSS - RSS after set-up; {args.threads} threads")
    roles = {"minift chunked": "vocab-minift", "full logits (HF)": "vocab-full"}
    results: dict[str, list[dict]] = {n: [] for n in roles}
    for rep in range(args.reps):
        for name in (list(roles) if rep % 2 == 0 else list(roles)[::-1]):
            results[name].append(run_worker(roles[name], args))
    print(f"\n{'side':<18}{'first loss':>11}{'median ms':>11}{'best ms':>9}{'tokens/s':>10}{'set-up MiB':>12}"
          f"{'peak growth MiB':>17}")
    summary = {}
    for name, runs in results.items():
        times = [t for r in runs for t in r["times"]]
        wall = statistics.median(times)
        growth = statistics.median(r["growth_mib"] for r in runs)
        summary[name] = (wall, growth)
        print(f"{name:<18}{runs[0]['first_loss']:>11.4f}{1e3 * wall:>11.0f}{1e3 * min(times):>9.0f}"
              f"{rows * seq / wall:>10.0f}{statistics.median(r['rss_setup_mib'] for r in runs):>12.0f}"
              f"{growth:>17.0f}")
        per_rep = ", ".join(f"{r['growth_mib']:.0f}" for r in runs)
        print(f"{'':<18}peak growth per repetition: {per_rep} MiB")
    (mw, mg), (fw, fg) = summary["minift chunked"], summary["full logits (HF)"]
    mem, speed = mg / fg, fw / mw
    print(f"\npeak growth minift / full = {mem:.2f}x (goal <= 0.5x): {verdict(mem <= 0.5)}")
    print(f"speed minift / full (median step times) = {speed:.2f}x (goal >= 1.0x): {verdict(speed >= 1.0)}")
    return mem <= 0.5 and speed >= 1.0


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
    examples = ragged_examples(trl_dataset_size(args.steps, args.warmup), SFT_MODEL["vocab_size"], seed=2)
    tokens, ends, losses = [], [], []
    if role == "trl-minift":
        from minift.packing import collate_packed, pack_examples

        side = MiniftSFT(minift_sft_model(SFT_MODEL))
        rows, _ = pack_examples(examples, SFT_SEQ)
        before = reset_peak_rss()
        ends.append(time.perf_counter())
        for i in range(0, len(rows), SFT_TRL_ROWS):
            batch = collate_packed(rows[i:i + SFT_TRL_ROWS], pad_token_id=0)
            losses.append(side.step(batch))
            tokens.append(int((batch["doc_index"] >= 0).sum()))
            ends.append(time.perf_counter())
        info = {"optimizer": "torch.optim.AdamW (for-each off, CPU default)", "batch": f"{SFT_TRL_ROWS} packed rows"}
    else:
        import tempfile

        import transformers as tf
        from datasets import Dataset
        from peft import LoraConfig as PeftLoraConfig
        from trl import SFTConfig, SFTTrainer

        from minift.models import tiny_model_dir

        matched = role == "trl-matched"
        model = build_sft_model(SFT_MODEL, SFT_WEIGHTS if matched else "fp32")
        tokenizer = tf.AutoTokenizer.from_pretrained(tiny_model_dir())
        dataset = Dataset.from_dict({"input_ids": [e["input_ids"] for e in examples]})
        common = {"output_dir": tempfile.mkdtemp(prefix="minift-bench-trl-"), "report_to": "none",
                  "save_strategy": "no", "disable_tqdm": True, "num_train_epochs": 1, "learning_rate": SFT_LR,
                  "seed": 0, "use_cpu": True}  # bf16 autocast on CPU needs use_cpu
        if matched:  # minift's settings: same dtype, no checkpointing, packing (bfd -> padding-free) into 512
            config = SFTConfig(**common, activation_checkpointing=False, packing=True, max_length=SFT_SEQ,
                               per_device_train_batch_size=SFT_TRL_ROWS, bf16=True)
        else:  # trl's defaults (bf16 autocast, gradient checkpointing, no packing, batch 8, max_length 1024)
            config = SFTConfig(**common)

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
                                  peft_config=PeftLoraConfig(**SFT_ADAPTER, task_type="CAUSAL_LM"),
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
    n = trl_dataset_size(args.steps, args.warmup)
    print(f"\n== sft trl: one epoch over the same {n} ragged sequences (log-normal lengths as in 'ragged', "
          f"all tokens trained), model A, LoRA {SFT_ADAPTER} ==")
    print(f"minift: {SFT_WEIGHTS} base + fp32 LoRA, bf16 autocast, no checkpointing, pack_examples into {SFT_SEQ}, "
          f"{SFT_TRL_ROWS} rows per step, clip 1.0 + AdamW")
    print("trl defaults: SFTConfig() defaults (bf16 autocast, gradient checkpointing, no packing, batch 8), "
          "fp32 model (trl's default dtype)")
    print(f"trl matched: {SFT_WEIGHTS} model, bf16 autocast, no checkpointing, packing=True (bfd, padding-free) into "
          f"{SFT_SEQ}, {SFT_TRL_ROWS} rows per step")
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


# part -> (timed steps, warm-up steps, process repetitions) when not given on the command line
SFT_DEFAULTS = {"dense": (6, 2, 1), "ragged": (8, 2, 1), "vocab": (2, 1, 3), "trl": (6, 1, 2)}


def load_line() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"


def bench_sft(args: argparse.Namespace) -> bool:
    """SFT step of model A (LoRA r16, bf16 autocast): dense, ragged (packing), vocab (chunked CE), trl parts."""
    torch.set_num_threads(args.threads)
    if args._worker:
        import json

        fn = worker_vocab if args._worker.startswith("vocab") else worker_trl
        print("RESULT " + json.dumps(fn(args._worker, args)))
        return True
    print(f"threads: torch.set_num_threads({args.threads}) -> {torch.get_num_threads()} intra-op, "
          f"{torch.get_num_interop_threads()} inter-op, in every process")
    print(f"model A: random Llama {SFT_MODEL}; LoRA {SFT_ADAPTER} via minift apply_lora; AdamW lr {SFT_LR}; "
          f"gradient checkpointing off")
    parts = SFT_PARTS if args.part == "all" else (args.part,)
    runners = {"dense": bench_sft_dense, "ragged": bench_sft_ragged, "vocab": bench_sft_vocab, "trl": bench_sft_trl}
    passed = {}
    for part in parts:
        steps, warmup, reps = SFT_DEFAULTS[part]
        part_args = argparse.Namespace(**{**vars(args), "steps": args.steps or steps, "reps": args.reps or reps,
                                          "warmup": warmup if args.warmup is None else args.warmup})
        start = time.perf_counter()
        print(f"\n[{part}] start: {load_line()}")
        passed[part] = runners[part](part_args)
        print(f"[{part}] {time.perf_counter() - start:.0f} s; end: {load_line()}")
    if len(parts) > 1:
        print("\nsummary: " + ", ".join(f"{p} {verdict(ok)}" for p, ok in passed.items()))
    return all(passed.values())


def add_sft_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--part", choices=(*SFT_PARTS, "all"), default="all", help="which part to run (default all)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per side (per process for vocab and trl); default dense 6, ragged 8, "
                             "vocab 2, trl 6")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps first; default 2 (dense, ragged), 1 (vocab, trl)")
    parser.add_argument("--reps", type=int, default=None,
                        help="processes per side, alternating, for vocab and trl (default 3 and 2)")
    parser.add_argument("--threads", type=int, default=SFT_THREADS, help=f"torch threads (default {SFT_THREADS})")
    parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)


# ----------------------------------------------------------------------------- driver

# case name -> (function adding its options, function running it and returning whether it passed)
CASES = {"lora": (add_lora_arguments, bench_lora), "data": (add_data_arguments, bench_data),
         "sft": (add_sft_arguments, bench_sft), "dpo": (bench_dpo.add_arguments, bench_dpo.run),
         "gguf": (bench_gguf.add_arguments, bench_gguf.run)}


def machine_line() -> str:
    return (f"machine: torch {torch.__version__}, {torch.get_num_threads()} thread(s) "
            f"({torch.get_num_interop_threads()} inter-op), transformers {transformers.__version__}, "
            f"python {platform.python_version()}, {platform.machine()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    subparsers = parser.add_subparsers(dest="case", required=True)
    for name, (add_arguments, run) in CASES.items():
        sub = subparsers.add_parser(name, help=run.__doc__)
        add_arguments(sub)
        sub.add_argument("--strict", action="store_true", help="exit with status 1 when the case misses its target")
        sub.set_defaults(run=run)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(machine_line())
    passed = args.run(args)
    return 1 if args.strict and not passed else 0


if __name__ == "__main__":
    sys.exit(main())
