"""The ``lora`` case of tools/bench.py: one LoRA training step, minift's ``apply_lora`` against peft's."""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Callable

import torch
from bench_common import oracles, paired_ratio
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from minift.lora.config import LoraConfig
from minift.lora.layers import apply_lora

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


def run(args: argparse.Namespace) -> bool:
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=40, help="timed steps per side (default 40)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per side first (default 3)")


