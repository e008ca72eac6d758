"""The ``judge`` case of tools/bench.py: how fast the demo's judge judges, in this process and through the server.

SmolLM2-135M-Instruct with the shipped judge adapter (recipes/data/judge_smollm2/) compares the held-out pairs of
recipes/data/demo_eval_pairs.jsonl, each asked in both orders (two questions a pair):

- ``local``: :class:`~minift.train.judges.LocalJudge` (one forward per question reads both replies' probabilities);
- ``server``: tools/serve.py in its own process with the adapter as a named model, asked by
  :class:`~minift.train.judges.APIJudge` through :class:`~minift.infer.client.ChatClient` (``--concurrency``
  requests in flight, top log-probs of the first reply token).

Reported: pairs judged per second and the agreement with the truth of each side; no target (information for
sizing RLAIF runs: a step of 16 prompts x k completions asks 16 * k * (k - 1) / 2 pairs).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_common import load_line

from minift.infer.client import ChatClient
from minift.model.load import load_tokenizer, resolve_model_path
from minift.train.judges import APIJudge, LocalJudge, pair_accuracy
from minift.train.teacher import load_teacher

ROOT = Path(__file__).resolve().parent.parent
JUDGE = ROOT / "recipes" / "data" / "judge_smollm2"
PAIRS = ROOT / "recipes" / "data" / "demo_eval_pairs.jsonl"


def start_server(threads: int) -> tuple[subprocess.Popen, str]:
    """tools/serve.py on SmolLM2 with the judge adapter, on a free port of 127.0.0.1; the process and its URL."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "serve.py"), "smollm2", "--adapter",
                             f"judge={JUDGE}", "--port", "0"], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if select.select([proc.stdout], [], [], 1.0)[0]:
            line = proc.stdout.readline()
            if line.startswith("serving "):
                return proc, line.split(" at ")[1].split()[0]
    proc.kill()
    raise RuntimeError("tools/serve.py did not start within 300 s")


def timed(judge, pairs: list[dict]) -> tuple[float, float]:
    """(pairs judged per second, agreement with the truth)."""
    started = time.perf_counter()
    accuracy, _ = pair_accuracy(judge, pairs)
    return len(pairs) / (time.perf_counter() - started), accuracy


def run(args: argparse.Namespace) -> bool:
    """The demo judge's throughput: pairs judged per second, locally and through tools/serve.py (no target)."""
    torch.set_num_threads(args.threads)
    pairs = [json.loads(line) for line in PAIRS.read_text().splitlines()][: args.pairs]
    model_dir = resolve_model_path("smollm2")
    tokenizer = load_tokenizer(model_dir)
    local = LocalJudge(load_teacher(model_dir, tokenizer, adapters=[str(JUDGE)]), tokenizer)
    print(f"SmolLM2-135M-Instruct + {JUDGE.relative_to(ROOT)}, fp32, {args.threads} torch threads; {load_line()}")
    print(f"{len(pairs)} held-out pairs, each asked in both orders; server: {args.concurrency} requests in flight")
    rows = {"local": timed(local, pairs)}
    del local
    proc, url = start_server(args.threads)
    try:
        client = ChatClient(url, "judge", api_key_env=None, timeout=300, max_retries=0, concurrency=args.concurrency)
        rows["server"] = timed(APIJudge(client), pairs)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    print(f"{'side':<8}{'pairs/s':>9}{'agreement':>11}")
    for name, (speed, accuracy) in rows.items():
        print(f"{name:<8}{speed:>9.2f}{accuracy:>11.0%}")
    return True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pairs", type=int, default=100, help="held-out pairs judged per side (default 100)")
    parser.add_argument("--concurrency", type=int, default=8, help="server requests in flight (default 8)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in each process (default 2)")
