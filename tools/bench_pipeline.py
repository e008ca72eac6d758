"""The pipeline's plan: ``recipes/pipeline.py --dry_run`` on the seeds' chain (six stages on the tiny model).

    python tools/bench.py pipeline [--reps 3] [--config recipes/configs/pipeline_chain.yaml]

Each repetition runs in fresh processes (the tiny model and tokenizer are built once before, outside the timing):
- ``plan``: in one process, after its imports, the time to read the file and make the plan (every stage's config
  checked, every dataset opened, format-checked, tokenized and packed where the steps need it, models and
  vocabularies checked, the plan printed); goal < 5 s;
- ``command``: the whole ``python recipes/pipeline.py --config FILE --dry_run`` as a user waits for it, interpreter
  start and imports included (information).
Medians over the repetitions. Also checked: no weights file is opened (the worker's audit hook sees every Python
``open``, and the model's safetensors are replaced by junk in a copy, so a read by any library fails).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import verdict

ROOT = Path(__file__).resolve().parents[1]
WORKER = """
import json, sys, time
sys.path.insert(0, {recipes!r})
import pipeline
opened = []
sys.addaudithook(lambda event, args: event == "open" and str(args[0]).endswith((".safetensors", ".bin", ".pt"))
                 and opened.append(str(args[0])))
started = time.perf_counter()
plans = pipeline.main(pipeline.parse_args(["--config", {config!r}, "--dry_run", "--output_dir", {out!r},
                                           "--model_name_or_path", {model!r}]))["plan"]
seconds = time.perf_counter() - started
print("RESULT " + json.dumps({{"seconds": seconds, "stages": len(plans), "opened": opened,
                               "steps": [p.steps for p in plans]}}))
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--config", default="recipes/configs/pipeline_chain.yaml")


def run(args: argparse.Namespace) -> bool:
    """The pipeline's --dry_run on the seeds' chain: the plan in < 5 s, no weights read."""
    from minift.model.load import tiny_model_dir

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"  # the tiny model with junk in place of its weights
        shutil.copytree(tiny_model_dir(), model)
        for weights in model.glob("*.safetensors"):
            weights.write_bytes(b"not weights" * 100)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        plan, command, opened = [], [], []
        for _ in range(args.reps):
            code = WORKER.format(recipes=str(ROOT / "recipes"), config=args.config, out=f"{tmp}/out", model=str(model))
            proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=300)
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr[-3000:])
            result = json.loads(proc.stdout.split("RESULT ", 1)[1])
            plan.append(result["seconds"])
            opened += result["opened"]
            started = time.perf_counter()
            proc = subprocess.run([sys.executable, "recipes/pipeline.py", "--config", args.config, "--dry_run",
                                   "--output_dir", f"{tmp}/out", "--model_name_or_path", str(model)], cwd=ROOT,
                                  env=env, capture_output=True, text=True, timeout=300)
            command.append(time.perf_counter() - started)
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr[-3000:])
    ok = statistics.median(plan) < 5.0 and not opened
    print(f"config: {args.config} ({result['stages']} stages; steps {result['steps']})")
    print(f"| side | median | runs |\n|---|---|---|\n| plan (after imports) | {statistics.median(plan):.2f} s | "
          f"{', '.join(f'{s:.2f}' for s in plan)} |\n| whole command | {statistics.median(command):.2f} s | "
          f"{', '.join(f'{s:.2f}' for s in command)} |")
    print(f"weights files opened: {len(opened)}")
    print(f"{verdict(ok)}: plan {statistics.median(plan):.2f} s (goal < 5 s), no weights read")
    return ok
