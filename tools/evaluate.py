"""Measure a base model and its adapters side by side on one dataset.

    python tools/evaluate.py tiny --adapter sft=out/sft_dpo/sft/adapter --adapter dpo=out/sft_dpo/final --dataset recipes/data/demo_eval.jsonl -o out/eval.json

For every record with a target (a completion, an assistant turn, or a prompt with a reference ``answer``):
``loss`` (mean cross-entropy per trained token, with the SFT recipe's label masks), ``perplexity`` =
exp(loss) and ``token_accuracy``. For records with a reference answer, greedy ``exact_match`` (stripped texts
equal) and ``contains`` (the answer appears in the completion). The base model is always measured, then each
``--adapter`` in order; a Markdown table is printed and ``-o`` writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from minift.data.read import RecordError, load_records
from minift.infer.cli import add_model_arguments, generator_from_args
from minift.infer.evaluation import evaluate_models, results_table


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--dataset", required=True, help="a dataset file, directory, saved or hub dataset")
    parser.add_argument("-o", "--output", help="write the figures here as JSON")
    parser.add_argument("--max_seq_length", type=int, default=128, help="as the SFT recipe's (default 128)")
    parser.add_argument("--train_on", choices=("completion", "all"), default="completion",
                        help="which tokens are scored, as the SFT recipe's train_on")
    parser.add_argument("--truncation", choices=("truncate", "drop"), default="truncate")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="greedy answer length limit")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--no_generate", action="store_true", help="skip exact match / contains (loss only)")
    args = parser.parse_args(argv)
    for name in ("max_seq_length", "max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        records = load_records(args.dataset)  # a bad file fails here, before the model loads
        gen = generator_from_args(args)
        results = evaluate_models(gen, gen.names, records, max_seq_length=args.max_seq_length,
                                  train_on=args.train_on, truncation=args.truncation,
                                  max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                  generate=not args.no_generate)
    except (ValueError, FileNotFoundError, RecordError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(results_table(results))
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        report = {"model": args.model, "adapters": gen.paths, "dataset": args.dataset, "results": results}
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
