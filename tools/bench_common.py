"""What the SFT and DPO benchmarks share: model "A", minift's training step, the compute precision,
peak-memory counters, fresh-process workers and verdicts. See tools/bench.py for the cases."""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from minift.lora.config import LoraConfig
from minift.lora.layers import apply_lora
from minift.model.attention import use_document_attention
from minift.train.setup import cpu_has_native_bf16

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench.py")
TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
RECIPES = os.path.join(os.path.dirname(TESTS), "recipes")


def oracles():
    """``tests/oracles.py``: peft and trl, the test-only references the comparison sides run; None when they are
    not installed (``pip install -e ".[test]"``)."""
    if TESTS not in sys.path:
        sys.path.append(TESTS)
    import oracles as module

    return module if module.available() else None

# Benchmark model "A" and its adapter (minift's apply_lora; peft's get_peft_model with the same values for trl).
SFT_MODEL = {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 4,
             "intermediate_size": 1536, "vocab_size": 32000}
SFT_ADAPTER = {"r": 16, "lora_alpha": 32, "target_modules": "all-linear", "lora_dropout": 0.0}
SFT_LR = 1e-4
SFT_MAX_GRAD_NORM = 1.0  # minift's recipe default (TrainConfig.max_grad_norm) and the Trainer's
SFT_SEQ = 512  # packed row length / dense sequence length
SFT_RAGGED_PER_STEP = 8  # sequences per step in the ragged and trl parts
SFT_LOGNORMAL = (5.0, 0.6, 32, 512)  # mu, sigma, min, max of the ragged lengths

# ``--model smollm2`` (the sft, dpo and grpo cases): SmolLM2-135M-Instruct's pretrained weights in place of model A, from
# the GGUF file minift.model.smollm2 fetches, dequantized once into minift's cache (tied embeddings).
SMOLLM2 = {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
           "intermediate_size": 1536, "vocab_size": 49152}
MODELS = {"a": SFT_MODEL, "smollm2": SMOLLM2}
MODEL = "a"

# The compute precision of every side: "bf16" (bf16 frozen weights, fp32 LoRA A/B, bf16 autocast) where the CPU
# multiplies bf16 natively (AVX512-BF16 / AMX), else "fp32": without those units PyTorch's bf16 GEMM is a
# scalar fallback ~100x slower than fp32 (0.3-1.2 vs 50-110 GFLOP/s measured on an AVX2-only EPYC).
PRECISION = "bf16" if cpu_has_native_bf16() else "fp32"


def precision() -> str:
    """The current PRECISION (after ``--precision``)."""
    return PRECISION


def set_precision(choice: str) -> str:
    """Set :data:`PRECISION` from ``--precision`` (auto, bf16 or fp32); returns it."""
    global PRECISION
    if choice != "auto":
        PRECISION = choice
    return PRECISION


def model_spec() -> dict:
    """The benchmarked model's shape: model A's, or SmolLM2's after ``--model smollm2``."""
    return MODELS[MODEL]


def model_name() -> str:
    return "SmolLM2-135M-Instruct (pretrained)" if MODEL == "smollm2" else "model A (random weights)"


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=list(MODELS), default="a",
                        help="a: model A, random weights (default); smollm2: SmolLM2-135M-Instruct, fetched once")


def set_model(choice: str) -> str:
    global MODEL
    MODEL = choice
    return MODEL


def add_precision_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="compute precision of every side; auto = bf16 where the CPU has native bf16 "
                             f"matrix units, else fp32 (here: {PRECISION})")


def autocast():
    """bf16 autocast on the CPU when PRECISION is bf16, else nothing."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=PRECISION == "bf16")


def build_sft_model(spec: dict, weights: str | None = None, seed: int = 0) -> nn.Module:
    """Random Llama from ``spec``, weights in ``weights`` (default PRECISION): the same for a given seed in every
    process (init in fp32, then cast). ``SMOLLM2``: its pretrained weights instead."""
    if spec is SMOLLM2:
        from minift.model.load import resolve_model_path

        model = LlamaForCausalLM.from_pretrained(resolve_model_path("smollm2"), attn_implementation="sdpa",
                                                 dtype=torch.float32).train()
    else:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**spec, attn_implementation="sdpa")).train()
    return model.to(torch.bfloat16) if (weights or PRECISION) == "bf16" else model.float()


def minift_sft_model(spec: dict, weights: str | None = None) -> nn.Module:
    """Model A with minift's LoRA on all 7 projections and document attention (as ``load_for_training``
    sets up); the trained A/B matrices are fp32 whatever the base dtype."""
    model = build_sft_model(spec, weights)
    use_document_attention(model)
    apply_lora(model, LoraConfig(**SFT_ADAPTER))
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    return model


def load_recipe(name: str):
    """``recipes/<name>.py`` as a module (recipes/ is not a package): the benchmarks time the recipes' own steps."""
    import importlib.util

    module_name = f"minift_recipe_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, os.path.join(RECIPES, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def bench_accelerator():
    """A one-process CPU Accelerator in the benchmark's precision (bf16 autocast when PRECISION is bf16), as a
    recipe's stage makes one."""
    from accelerate import Accelerator

    return Accelerator(cpu=True, mixed_precision="bf16" if PRECISION == "bf16" else "no")


class MiniftSFT:
    """minift's training step: recipes/sft.py's ``sft_step`` (``CausalLMLoss`` prepared by Accelerate, so under bf16
    autocast when PRECISION is bf16; mean over trained tokens; backward), then gradient clipping (1.0) and AdamW
    as the stage does them. ``step`` returns the mean loss."""

    def __init__(self, model: nn.Module):
        from minift.train.forward import CausalLMLoss

        self.model, self.accelerator = model, bench_accelerator()
        self.params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(self.params, lr=SFT_LR, weight_decay=0.0)
        self.loss_model, self.optimizer = self.accelerator.prepare(CausalLMLoss(model), optimizer)
        self.sft_step = load_recipe("sft").sft_step

    def step(self, batch: dict) -> float:
        loss, _ = self.sft_step(self.accelerator, self.loss_model, [batch])
        self.accelerator.clip_grad_norm_(self.params, SFT_MAX_GRAD_NORM)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss


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


_GEMM_INPUTS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def gemm_rate(n: int = 2048, repeats: int = 3, precision: str | None = None) -> float:
    """FLOP/s of an n x n x n matmul in ``precision`` (default PRECISION): median of ``repeats`` timings after one
    untimed call."""
    dtype = torch.bfloat16 if (precision or PRECISION) == "bf16" else torch.float32
    key = (n, dtype)
    if key not in _GEMM_INPUTS:
        g = torch.Generator().manual_seed(0)
        _GEMM_INPUTS[key] = (torch.randn(n, n, generator=g).to(dtype), torch.randn(n, n, generator=g).to(dtype))
    a, b = _GEMM_INPUTS[key]
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / statistics.median(times)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median of step-by-step ratios: neighbouring steps share the machine's load, so its swings cancel."""
    return statistics.median(x / y for x, y in zip(a, b))


def load_line() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"


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
    """Run ``tools/bench.py CASE --_worker role`` in a fresh process; return the JSON line it prints."""
    cmd = [sys.executable, BENCH, case, "--_worker", role, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--threads", str(args.threads), "--precision", PRECISION, *(["--model", args.model] if getattr(args, "model", None)
                                                                     else [])]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_OFFLINE": "1", "DISABLE_MLFLOW_INTEGRATION": "TRUE", "WANDB_DISABLED": "true"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker {role} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])
