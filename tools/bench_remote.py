"""GRPO with rollouts from a server: step time of local, server-synchronous and server-async rollouts, side by side.

    python tools/bench.py grpo --rollout_backend server [--steps 60] [--reps 3]

``recipes/grpo.py`` on the demo (the tiny model, 16 prompts x 8 completions a step, exact-match reward), as a user
runs it, each run in a fresh process: sampling in-process (``local``), or by ``tools/serve.py`` in its own process
(``--rollout_backend server``) synchronously (``server sync``: the trainer waits for each batch) and one step off
(``server async``: the next batch is sampled while the trainer trains). Trainer and server each get one OpenMP
thread (2 cores; two spinning teams of 2 thrash), local too. A side's step time is the difference between a run of
``--steps`` + 10 steps and one of 10, over ``--steps`` (start-up and the end's evaluation cancel out); the median
over ``--reps``. Also reported: the mean time per step spent writing the adapter and having the server load it
(``adapter_sync_s``), and the sampler mismatch logged. Goal (issue): async <= 0.8x the synchronous server step.
"""

from __future__ import annotations

import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import verdict

ROOT = Path(__file__).resolve().parents[1]
SIDES = {"local": [], "server sync": ["--rollout_backend", "server"],
         "server async": ["--rollout_backend", "server", "--async_rollouts"]}
SHORT = 10


def start_server(env: dict) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools/serve.py"), "tiny", "--port", "0", "--max_batch_size",
                             "128", "--batch_wait_ms", "20"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 1.0)[0]:
            line = proc.stdout.readline()
            if line.startswith("serving "):
                return proc, line.split(" at ")[1].split()[0]
        if proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError("tools/serve.py did not start")


def timed_run(flags: list[str], steps: int, out: Path, env: dict) -> tuple[float, dict]:
    """Seconds of one recipes/grpo.py run of ``steps`` steps, and its last logged metrics."""
    argv = [sys.executable, str(ROOT / "recipes/grpo.py"), "--max_steps", str(steps), "--logging_steps", str(steps),
            "--answer_eval_dataset", "none", "--output_dir", str(out), *flags]
    started = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[1:])} failed:\n{proc.stderr[-3000:]}")
    return seconds, json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])


def run(args) -> bool:
    """GRPO on the demo: step time with local, server-synchronous and server-async rollouts (goal async <= 0.8x
    synchronous)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc, url = start_server(env)
    steps, times, sync_s, mismatch = args.steps, {name: [] for name in SIDES}, {}, {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for rep in range(args.reps):
                for name, flags in SIDES.items():  # sides alternate, so drift in the machine's speed hits each alike
                    flags = [*flags, "--rollout_url", url, "--rollout_model", "tiny"] if flags else []
                    short, _ = timed_run(flags, SHORT, Path(tmp) / f"{rep}-{name}-short", env)
                    long, last = timed_run(flags, SHORT + steps, Path(tmp) / f"{rep}-{name}-long", env)
                    times[name].append((long - short) / steps)
                    if "adapter_sync_s" in last:
                        sync_s.setdefault(name, []).append(last["adapter_sync_s"] / (SHORT + steps))
                        mismatch.setdefault(name, []).append(last["sampler_mismatch"])
    finally:
        proc.kill()
        proc.wait()
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"recipes/grpo.py demo (tiny model, 16 prompts x 8 completions a step), {steps} steps per timed run, "
          f"median of {args.reps}; one OpenMP thread per process; tools/serve.py --batch_wait_ms 20")
    print("| rollouts | step time | vs server sync | adapter write + load a step | sampler mismatch |")
    print("|---|---|---|---|---|")
    for name, seconds in median.items():
        sync = f"{statistics.median(sync_s[name]) * 1000:.0f} ms" if name in sync_s else "-"
        gap = f"{statistics.median(mismatch[name]):.1e}" if name in mismatch else "-"
        print(f"| {name} | {seconds * 1000:.0f} ms | {seconds / median['server sync']:.2f}x | {sync} | {gap} |")
    ratio = median["server async"] / median["server sync"]
    ok = ratio <= 0.8
    print(f"{verdict(ok)}: async {ratio:.2f}x the synchronous server step time (goal <= 0.8x)")
    return ok
