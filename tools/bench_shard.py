"""Memory per process of a full fine-tune across 2 CPU processes: FSDP (minift's sharding) and DeepSpeed ZeRO-2 /
ZeRO-3 against DDP.

    python tools/bench.py shard [--steps 3] [--seq 128]

SmolLM2-135M-Instruct (135M parameters, fp32), ``recipes/sft.py --lora_r 0`` on the SFT demo for ``--steps``
optimizer steps (1 row of ``--seq`` tokens per process a step), launched as a user launches it, each side in a
fresh launcher: DDP (``accelerate launch --multi_gpu --num_processes 2``), FSDP (``--config_file
recipes/configs/accelerate_fsdp_cpu.yaml``) and the shipped ZeRO configs with ``--num_processes 2 --mixed_precision
no``. Measured: the peak RSS of the largest process (Linux keeps it for the
children a process waits for), and the baseline of one process that only imports minift and loads the model.
Peak growth = peak - baseline: the weights' second copy, gradients and AdamW's two moments under DDP (about 3 x
4 bytes a parameter, plus DDP's gradient buckets), their halves under FSDP plus one block gathered at a time.
The goal the issue names: FSDP's growth about half DDP's or less (<= 0.6x); ZeRO's ratios are reported.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import verdict

ROOT = Path(__file__).resolve().parents[1]
MEASURE = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
           "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, rc)")
BASELINE = ("import resource; from minift.model.load import load_model_and_tokenizer; "
            "load_model_and_tokenizer('smollm2', dtype='float32'); "
            "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, 0)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq", type=int, default=128)


def peak_mib(argv: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB of the largest process ``argv`` starts, seconds)."""
    started = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - started
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PEAK ")]
    if not lines or lines[-1].split()[2] != "0":
        raise RuntimeError(f"{' '.join(argv[:8])} ... failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return int(lines[-1].split()[1]) / 1024, seconds


def run(args: argparse.Namespace) -> bool:
    """A full fine-tune of SmolLM2 on 2 CPU processes: peak RSS growth per process, FSDP vs DDP (goal <= 0.6x)."""
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    sides = {"DDP": [*launch, "--multi_gpu", "--num_processes", "2", "--mixed_precision", "no"],
             "FSDP": [*launch, "--config_file", str(ROOT / "recipes/configs/accelerate_fsdp_cpu.yaml")],
             **{f"ZeRO-{z}": [*launch, "--config_file", str(ROOT / f"recipes/configs/accelerate_zero{z}.yaml"),
                              "--num_processes", "2", "--mixed_precision", "no"] for z in (2, 3)}}
    results = {}
    baseline, _ = peak_mib([sys.executable, "-c", BASELINE])
    with tempfile.TemporaryDirectory() as tmp:
        for name, launcher in sides.items():
            recipe = [str(ROOT / "recipes/sft.py"), "--model_name_or_path", "smollm2", "--lora_r", "0",
                      "--learning_rate", "1e-5", "--max_steps", str(args.steps), "--max_seq_length", str(args.seq),
                      "--per_device_train_batch_size", "1", "--validation_split", "0", "--answer_eval_dataset",
                      "none", "--logging_steps", "1", "--output_dir", f"{tmp}/{name}"]
            results[name] = peak_mib([sys.executable, "-c", MEASURE, *launcher, *recipe])
            losses = [json.loads(x).get("loss") for x in Path(f"{tmp}/{name}/metrics.jsonl").read_text().splitlines()]
            results[name] += (losses,)
    growth = {name: peak - baseline for name, (peak, _, _) in results.items()}
    ratio = growth["FSDP"] / growth["DDP"]
    print(f"model: SmolLM2-135M-Instruct, fp32, full fine-tune, {args.steps} steps of 1 x {args.seq} tokens "
          f"per process")
    print(f"baseline (one process, model loaded): {baseline:.0f} MiB")
    print("| side | peak RSS, largest process | growth over baseline | x DDP's | whole run | losses |\n"
          "|---|---|---|---|---|---|")
    for name, (peak, seconds, losses) in results.items():
        print(f"| {name} | {peak:.0f} MiB | {growth[name]:.0f} MiB | {growth[name] / growth['DDP']:.2f}x | "
              f"{seconds:.0f} s | {', '.join(f'{x:.4f}' for x in losses if x is not None)} |")
    ok = ratio <= 0.6
    print(f"{verdict(ok)}: FSDP's peak growth per process {ratio:.2f}x DDP's (goal <= 0.6x)")
    return ok
