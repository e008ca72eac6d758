"""The ``data`` case of tools/bench.py: minift's SFT data pipeline against the tokenizer alone."""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

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


def run(args: argparse.Namespace) -> bool:
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--records", type=int, default=50_000, help="synthetic records (default 50000)")
    parser.add_argument("--max_seq_length", type=int, default=2048, help="packed row length (default 2048)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of each side (default 3)")


