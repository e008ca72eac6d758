"""Benchmarks that time minift against a reference implementation in the same process.

    python tools/bench.py CASE [options] [--strict]

Each case prints the machine, a table of per-side timings and a PASS/FAIL line against its
target. The exit status is 0 unless ``--strict`` is given and the case fails. The machine is
assumed noisy: sides alternate step by step (A B B A ...), ratios are medians of paired steps,
and single-thread CPU time (which other processes cannot inflate) is reported beside wall time.
The reference sides (peft, trl) come from ``tests/oracles.py``, the test-only oracles; without
them (``pip install -e ".[test]"``) a case runs minift alone and says so.

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
      [--threads 2] [--precision auto|bf16|fp32]``
      SFT training steps of model "A" (random Llama: hidden 512, 8 layers, 8/4 heads, MLP 1536, vocab 32k) with
      minift's LoRA (r16, alpha 32, all 7 projections), no gradient checkpointing, loss via ``CausalLMLoss``,
      gradient clipping 1.0 and AdamW; 2 torch threads in every process. Precision (``--precision auto``): bf16
      frozen weights, fp32 LoRA A/B and bf16 autocast where the CPU multiplies bf16 natively (AVX-512 / AMX),
      else fp32 throughout (PyTorch's bf16 fallback is ~100x slower than fp32 there). Parts (``tools/bench_sft*.py``):
      ``dense``: 4 x 512 tokens; tokens/s and share of the ceiling set by a 2048^3 GEMM in the same precision
      timed between the steps (FLOP count in ``bench_sft_dense``; goal >= 75%). ``ragged``: 8 log-normal-length
      sequences per step, packed (pack_examples + collate_flat: one padding-free row, document attention) vs
      padded (collate_padded + attention_mask), real tokens/s (goal >= 1.3x). ``vocab``: hidden 256, vocab 128k,
      first half of each 2 x 1024 sequence prompt-masked; chunked ``CausalLMLoss`` vs HF's full-logits
      ``model(..., labels=)``, each side in its own processes, peak RSS growth (goal <= 0.5x) at equal or better
      speed. ``trl``: one epoch over the same ragged sequences, each side in its own processes (sides rotating):
      minift vs trl's SFTTrainer + peft with its defaults (goal >= 1.5x real tokens/s) and matched (same dtype,
      no checkpointing, its packing; goal >= 1.0x), and peak RSS growth <= trl's. Per-part defaults for steps /
      warm-up / processes: dense 6/2, ragged 8/2, vocab 2/1/3, trl 6/1/2.
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

from minift.lora.config import LoraConfig
from minift.lora.layers import apply_lora

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_dpo  # noqa: E402  (sibling files: tools/ is not a package)
import bench_gguf  # noqa: E402
import bench_sft  # noqa: E402
from bench_common import oracles, paired_ratio  # noqa: E402

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
    """peft's ``get_peft_model`` with the same adapter settings (tests/oracles.py), or None without peft."""
    refs = oracles()
    return None if refs is None else lambda model: refs.peft_model(model, **LORA_ADAPTER)


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
    from minift.data.read import Record

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
    from minift.data.encode import encode_sft
    from minift.data.formats import normalize_all
    from minift.data.packing import pack_examples
    from minift.model.load import load_model_and_tokenizer

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


# ----------------------------------------------------------------------------- driver

# case name -> (function adding its options, function running it and returning whether it passed)
CASES = {"lora": (add_lora_arguments, bench_lora), "data": (add_data_arguments, bench_data),
         "sft": (bench_sft.add_sft_arguments, bench_sft.bench_sft), "dpo": (bench_dpo.add_arguments, bench_dpo.run),
         "gguf": (bench_gguf.add_arguments, bench_gguf.run)}


def machine_line() -> str:
    return (f"machine: torch {torch.__version__}, {torch.get_num_threads()} thread(s) "
            f"({torch.get_num_interop_threads()} inter-op), transformers {transformers.__version__}, "
            f"python {platform.python_version()}, {platform.machine()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    subparsers = parser.add_subparsers(dest="case", required=True)
    for name, (add_arguments, run) in CASES.items():
        sub = subparsers.add_parser(name, help=run.__doc__.replace("%", "%%"))  # argparse formats help with %
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
