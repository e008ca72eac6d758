"""The ``sft`` case of tools/bench.py: SFT training steps of model "A" (see tools/bench.py for the parts; the
``trl`` part is in tools/bench_sft_trl.py).

    python tools/bench.py sft [--part dense|ragged|vocab|trl|all] [--steps N] [--warmup N] [--reps N]
                              [--threads 2] [--precision auto|bf16|fp32]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import bench_sft_trl
import torch
from bench_common import (
    SFT_ADAPTER,
    SFT_LOGNORMAL,
    SFT_LR,
    SFT_MAX_GRAD_NORM,
    SFT_MODEL,
    SFT_RAGGED_PER_STEP,
    SFT_SEQ,
    MiniftSFT,
    add_model_argument,
    add_precision_argument,
    autocast,
    gemm_rate,
    load_line,
    minift_sft_model,
    model_name,
    model_spec,
    paired_ratio,
    precision,
    ragged_examples,
    reset_peak_rss,
    rss_mib,
    run_worker,
    set_model,
    set_precision,
    verdict,
)
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from minift.train.setup import cpu_has_native_bf16

SFT_VOCAB_MODEL = {**SFT_MODEL, "hidden_size": 256, "intermediate_size": 768, "vocab_size": 128_000}
SFT_THREADS = 2  # default of --threads
SFT_DENSE_BATCH = 4
SFT_VOCAB_BATCH = (2, 1024)
SFT_PARTS = ("dense", "ragged", "vocab", "trl")


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


def model_gemm_rate(tokens: int, repeats: int = 3) -> float:
    """FLOP/s of the model's own forward GEMMs at ``tokens`` rows (q, k, v, o, gate, up, down, LM head), in PRECISION."""
    spec = model_spec()
    h, f, v = spec["hidden_size"], spec["intermediate_size"], spec["vocab_size"]
    kv = h * spec["num_key_value_heads"] // spec["num_attention_heads"]
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, f), (h, f), (f, h), (h, v)]
    dtype = torch.bfloat16 if precision() == "bf16" else torch.float32
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(tokens, i, generator=g).to(dtype), torch.randn(i, o, generator=g).to(dtype)) for i, o in shapes]
    flops = sum(2 * tokens * i * o for i, o in shapes)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        for x, w in pairs:
            x @ w
        times.append(time.perf_counter() - start)
    return flops / statistics.median(times[1:])


def bench_sft_dense(args: argparse.Namespace) -> bool:
    """Dense 4 x 512 LoRA step: tokens/s and share of the GEMM ceiling in PRECISION (goal >= 75%).

    FLOPs per token = 4 x (decoder linear params + LM-head params) + 12 x layers x seq x hidden:
    2 x params forward plus 2 x params backward for the activation gradients only (the frozen base
    weights need no weight gradient); attention scores and weighted sum 2 x 2 x seq x hidden per layer
    forward over the full (not causal-halved) context, backward 2x that. LoRA's own A/B FLOPs
    (6 x r x (in + out) per projection, ~4% here) and element-wise work are not counted.
    Ceiling tokens/s = GEMM rate (2048^3 matmul in PRECISION, measured between the steps) / FLOPs per token.
    The rate of the model's own GEMM shapes at 2048 rows is printed beside it.
    """
    flops, linear, head = dense_flops_per_token(model_spec(), SFT_SEQ)
    tokens = SFT_DENSE_BATCH * SFT_SEQ
    print(f"\n== sft dense: batch {SFT_DENSE_BATCH} x {SFT_SEQ}, no padding, all tokens trained, {precision()} ==")
    print(f"FLOPs/token = 4 x ({linear:,} linear + {head:,} head) + 12 x {model_spec()['num_hidden_layers']} x {SFT_SEQ}"
          f" x {model_spec()['hidden_size']} = {flops / 1e6:.1f} MFLOP")
    ids = torch.randint(model_spec()["vocab_size"], (SFT_DENSE_BATCH, SFT_SEQ), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    side = MiniftSFT(minift_sft_model(model_spec()))
    first_loss = side.step(batch)
    for _ in range(args.warmup - 1):
        side.step(batch)
    gemm_rate()
    rates, shape_rates, times, shares = [], [], [], []
    for _ in range(args.steps):  # each round: the GEMM rates, then one step
        rates.append(gemm_rate())
        shape_rates.append(model_gemm_rate(tokens))
        start = time.perf_counter()
        side.step(batch)
        times.append(time.perf_counter() - start)
        shares.append(tokens / times[-1] * flops / rates[-1])
    rate, wall = statistics.median(rates), statistics.median(times)
    tps = tokens / wall
    share = tps * flops / rate
    print(f"{precision()} GEMM 2048^3: median {rate / 1e9:.0f} GFLOP/s over {len(rates)} rounds (min {min(rates) / 1e9:.0f}"
          f", max {max(rates) / 1e9:.0f}) -> ceiling {rate / flops:,.0f} tokens/s; the model's own GEMM shapes at "
          f"{tokens} rows: {statistics.median(shape_rates) / 1e9:.0f} GFLOP/s")
    print(f"{args.steps} timed steps after {args.warmup} warm-up; {torch.get_num_threads()} threads\n")
    print(f"{'first loss':>11}{'median ms':>11}{'best ms':>9}{'tokens/s':>10}{'GFLOP/s':>9}{'share':>8}{'paired share':>14}")
    print(f"{first_loss:>11.4f}{1e3 * wall:>11.0f}{1e3 * min(times):>9.0f}{tps:>10.0f}{tps * flops / 1e9:>9.0f}"
          f"{share:>8.1%}{statistics.median(shares):>14.1%}")
    print(f"\nshare of the {precision()} GEMM ceiling = {share:.1%} (goal >= 75%): {verdict(share >= 0.75)}")
    print("(paired share: per round, step tokens/s x FLOPs/token / that round's GEMM rate, median over rounds)")
    return share >= 0.75


def bench_sft_ragged(args: argparse.Namespace) -> bool:
    """Ragged 8 sequences per step: packed (no mask) vs padded (attention_mask), real tokens/s (goal >= 1.3x)."""
    from minift.data.packing import collate_flat, collate_padded, pack_examples

    steps = args.steps
    n_steps = steps + args.warmup
    examples = ragged_examples(n_steps * SFT_RAGGED_PER_STEP, model_spec()["vocab_size"], seed=1)
    batches = [examples[i * SFT_RAGGED_PER_STEP:(i + 1) * SFT_RAGGED_PER_STEP] for i in range(n_steps)]
    real = [sum(len(e["input_ids"]) for e in b) for b in batches]
    padded_cells = [SFT_RAGGED_PER_STEP * max(len(e["input_ids"]) for e in b) for b in batches]
    print(f"\n== sft ragged: {SFT_RAGGED_PER_STEP} sequences per step, lengths log-normal(mu {SFT_LOGNORMAL[0]}, "
          f"sigma {SFT_LOGNORMAL[1]}) clamped to {SFT_LOGNORMAL[2]}..{SFT_LOGNORMAL[3]} ==")
    print(f"{n_steps} batches: {sum(real):,} real tokens, padding when padded {1 - sum(real) / sum(padded_cells):.1%}")

    def packed(b: list[dict]) -> dict:
        return collate_flat(pack_examples(b, SFT_SEQ)[0])

    def padded(b: list[dict]) -> dict:
        return collate_padded(b, pad_token_id=0)

    base = minift_sft_model(model_spec())
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
          f"{precision()}\n")
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


# -- the vocab part: each side alone in fresh processes

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
            with autocast():
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


# part -> (timed steps, warm-up steps, process repetitions) when not given on the command line
SFT_DEFAULTS = {"dense": (6, 2, 1), "ragged": (8, 2, 1), "vocab": (2, 1, 3), "trl": (6, 1, 2)}


def run(args: argparse.Namespace) -> bool:
    """SFT step of model A (LoRA r16): dense, ragged (packing), vocab (chunked CE), trl parts."""
    torch.set_num_threads(args.threads)
    set_precision(args.precision)
    set_model(args.model)
    if args._worker:
        import json

        fn = worker_vocab if args._worker.startswith("vocab") else bench_sft_trl.worker_trl
        print("RESULT " + json.dumps(fn(args._worker, args)))
        return True
    print(f"threads: torch.set_num_threads({args.threads}) -> {torch.get_num_threads()} intra-op, "
          f"{torch.get_num_interop_threads()} inter-op, in every process")
    print(f"{model_name()}: Llama {model_spec()}; LoRA {SFT_ADAPTER} via minift apply_lora; AdamW lr {SFT_LR}; "
          f"gradient checkpointing off; precision {precision()} (native bf16 matrix units: {cpu_has_native_bf16()})")
    parts = SFT_PARTS if args.part == "all" else (args.part,)
    runners = {"dense": bench_sft_dense, "ragged": bench_sft_ragged, "vocab": bench_sft_vocab,
               "trl": bench_sft_trl.bench_sft_trl}
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--part", choices=(*SFT_PARTS, "all"), default="all", help="which part to run (default all)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per side (per process for vocab and trl); default dense 6, ragged 8, "
                             "vocab 2, trl 6")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps first; default 2 (dense, ragged), 1 (vocab, trl)")
    parser.add_argument("--reps", type=int, default=None,
                        help="processes per side, alternating, for vocab and trl (default 3 and 2)")
    parser.add_argument("--threads", type=int, default=SFT_THREADS, help=f"torch threads (default {SFT_THREADS})")
    add_precision_argument(parser)
    add_model_argument(parser)
    parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)

