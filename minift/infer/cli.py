"""Command-line options shared by tools/generate.py, tools/evaluate.py and tools/serve.py."""

from __future__ import annotations

import argparse

import torch

from minift.infer.engine import Generator, parse_adapter_specs
from minift.train.sampling import SamplingParams


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="base model: a directory, a .gguf file, a hub id, 'tiny' or 'smollm2'")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                        help="an adapter directory (PEFT format, minift's or peft's) under a name; repeat for more")
    parser.add_argument("--dtype", default="auto", help="weights dtype: auto (bfloat16 on CUDA, else float32), "
                                                       "float32, bfloat16, float16")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default: cuda when available)")
    parser.add_argument("--merge", action="store_true", help="fold the active adapter into the base weights "
                                                             "(faster; switching adapters then costs a merge)")
    parser.add_argument("--chat_template", default=None, help="a Jinja chat template file (default: the "
                                                              "tokenizer's, else ChatML)")


def add_sampling_arguments(parser: argparse.ArgumentParser, *, max_new_tokens: int = 256) -> None:
    parser.add_argument("--max_new_tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (the default) is greedy")
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=0, help="0: off")
    parser.add_argument("--min_p", type=float, default=0.0)
    parser.add_argument("--stop", action="append", default=[], help="a string that ends a completion; repeatable")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (completion j of a prompt uses (seed, j))")


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, stop=tuple(args.stop), seed=args.seed)


def generator_from_args(args: argparse.Namespace) -> Generator:
    """The base model and every ``--adapter`` (all checked before the weights load)."""
    adapters = parse_adapter_specs(args.adapter)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    return Generator.load(args.model, adapters, dtype=dtype, device=device, merge=args.merge,
                          chat_template=args.chat_template)


def default_adapter(gen: Generator, requested: str | None) -> str:
    """``--use NAME`` if given (checked), else the last adapter loaded, else the base."""
    if requested is None:
        return gen.names[-1]
    if requested not in gen.names:
        raise ValueError(f"--use {requested}: no such model; loaded: {', '.join(gen.names)}")
    return requested

