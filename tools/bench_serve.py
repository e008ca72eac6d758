"""The ``serve`` case of tools/bench.py: the HTTP server's batched decoding and its per-request overhead.

Model A (random weights) behind :class:`~minift.infer.server.APIServer` in this process, on 127.0.0.1 with a
free port; clients are plain ``urllib`` threads posting ``/v1/completions`` with token-id prompts (64 tokens,
greedy, 64 new). Three measurements, alternated within each repetition so that the machine's load swings hit
all of them alike:

- ``direct``: ``Generator.generate`` on one prompt, no HTTP;
- ``one at a time``: the same prompt as one request, waiting for its answer before the next;
- ``16 at once``: 16 requests sent together, which the server decodes as one batch.

Targets: aggregate new tokens/s of ``16 at once`` >= 3x ``one at a time``; a lone request's latency within 10%
of ``direct`` (median of paired ratios).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import threading
import time
import urllib.request

import torch
from bench_common import (
    SFT_MODEL,
    add_precision_argument,
    build_sft_model,
    load_line,
    paired_ratio,
    precision,
    set_precision,
    verdict,
)

from minift.infer.engine import Generator
from minift.infer.server import APIServer, ServerConfig
from minift.train.sampling import SamplingParams

CONCURRENT, PROMPT_TOKENS, NEW_TOKENS = 16, 64, 64
BATCH_GAIN, LATENCY_OVERHEAD = 3.0, 1.10


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer with one token per id of model A's vocabulary (``w3``, ``w4``, ...), so that every
    id the random model picks decodes to text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def generate_once(gen: Generator, prompt: list[int], params: SamplingParams) -> tuple[float, int]:
    """The generation API on one prompt, no HTTP: latency (s) and new tokens."""
    start = time.perf_counter()
    [c] = gen.generate([prompt], params)
    return time.perf_counter() - start, len(c.token_ids)


def serve_once(url: str, prompt: list[int]) -> tuple[float, int]:
    """One request, answered: its latency (s) and new tokens."""
    start = time.perf_counter()
    answer = post(url, {"model": "A", "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0})
    return time.perf_counter() - start, answer["usage"]["completion_tokens"]


def serve_together(url: str, prompts: list[list[int]]) -> tuple[float, int]:
    """All prompts as simultaneous requests: the time until the last answer, and the new tokens in all."""
    results: list[tuple[float, int]] = []
    threads = [threading.Thread(target=lambda p=p: results.append(serve_once(url, p)), daemon=True) for p in prompts]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    if len(results) != len(prompts):
        raise RuntimeError(f"{len(prompts) - len(results)} of {len(prompts)} requests were not answered in 600 s")
    return time.perf_counter() - start, sum(tokens for _, tokens in results)


def rate(rows: list[tuple[float, int]]) -> float:
    """New tokens per second over ``(seconds, new tokens)`` measurements."""
    return sum(t for _, t in rows) / sum(s for s, _ in rows)


def run(args: argparse.Namespace) -> bool:
    """Serving: 16 concurrent requests vs one at a time (target >= 3x new tokens/s); a lone request vs the
    generation API called directly (target <= 1.10x latency)."""
    set_precision(args.precision)
    torch.set_num_threads(args.threads)
    gen = Generator(build_sft_model(SFT_MODEL).eval(), word_tokenizer(SFT_MODEL["vocab_size"]))
    server = APIServer(gen, ServerConfig(served_model_name="A", max_batch_size=CONCURRENT), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = server.url + "/completions"
    rng = random.Random(0)
    prompts = [[rng.randrange(3, SFT_MODEL["vocab_size"]) for _ in range(PROMPT_TOKENS)] for _ in range(CONCURRENT)]
    params = SamplingParams(max_new_tokens=NEW_TOKENS)
    print(f"model A {SFT_MODEL}, random weights, {precision()}, {args.threads} torch threads; {load_line()}")
    print(f"{CONCURRENT} prompts of {PROMPT_TOKENS} tokens, greedy, {NEW_TOKENS} new tokens each; {args.reps} reps "
          f"(+1 warm-up), urllib clients on {server.url}")
    direct, single, together = [], [], []  # (seconds, new tokens) per measurement
    try:
        for rep in range(args.reps + 1):
            rows_direct, rows_single = [], []
            for i, prompt in enumerate(prompts[: args.singles]):
                if (rep + i) % 2:  # alternate which of the pair goes first
                    rows_single.append(serve_once(url, prompt))
                    rows_direct.append(generate_once(gen, prompt, params))
                else:
                    rows_direct.append(generate_once(gen, prompt, params))
                    rows_single.append(serve_once(url, prompt))
            burst = serve_together(url, prompts)
            if rep:  # the first repetition warms up
                direct += rows_direct
                single += rows_single
                together.append(burst)
    finally:
        server.shutdown()
        server.server_close()
    print(f"{'side':<14}{'requests':>9}{'median s':>10}{'new tokens/s':>14}")
    for name, rows in (("direct", direct), ("one at a time", single)):
        print(f"{name:<14}{len(rows):>9}{statistics.median(s for s, _ in rows):>10.3f}{rate(rows):>14.1f}")
    print(f"{'16 at once':<14}{CONCURRENT * len(together):>9}{statistics.median(s for s, _ in together):>10.3f}"
          f"{rate(together):>14.1f}   (seconds: until the last of the {CONCURRENT} answers)")
    gain = rate(together) / rate(single)
    overhead = paired_ratio([s for s, _ in single], [s for s, _ in direct])
    ok_gain, ok_latency = gain >= BATCH_GAIN, overhead <= LATENCY_OVERHEAD
    print(f"batched decoding: {gain:.2f}x the new tokens/s of one request at a time (target >= {BATCH_GAIN}x): "
          f"{verdict(ok_gain)}")
    print(f"a lone request: {overhead:.3f}x the latency of calling Generator.generate (median of paired ratios; "
          f"target <= {LATENCY_OVERHEAD}x): {verdict(ok_latency)}")
    return ok_gain and ok_latency


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reps", type=int, default=2, help="timed repetitions after one warm-up (default 2)")
    parser.add_argument("--singles", type=int, default=CONCURRENT,
                        help=f"prompts served one at a time (and directly) per repetition (default {CONCURRENT})")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    add_precision_argument(parser)
