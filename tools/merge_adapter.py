"""Merge one or more adapters (applied in order) into a full-precision base; write a plain HF model directory.

    python tools/merge_adapter.py BASE DEFAULT_ADAPTER [DEFAULT_ADAPTER ...] -o OUT [--dtype bfloat16] [--max_shard_size 2GB]

BASE is a model directory, a ``.gguf`` file, a hub id, ``tiny`` or ``smollm2``. Adapters trained on a 4-bit base merge into the
unquantized base here, so the result is exact.
"""

from __future__ import annotations

import argparse
import logging
import sys

from minift.lora.merge import merge_and_save


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", help="base model: a directory, a .gguf file, a hub id, 'tiny' or 'smollm2'")
    parser.add_argument("adapters", nargs="+", help="adapter directories, applied in this order")
    parser.add_argument("-o", "--output", required=True, help="directory for the merged model")
    parser.add_argument("--dtype", default="float32", help="dtype of the merged weights (float32, bfloat16, float16)")
    parser.add_argument("--max_shard_size", default="2GB", help="largest safetensors shard, e.g. 2GB or 500MB")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = merge_and_save(args.base, args.adapters, args.output, dtype=args.dtype,
                             max_shard_size=args.max_shard_size)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"merged model written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
