"""Talk to a trained model: one prompt, a JSONL file of prompts, or an interactive chat.

    python tools/generate.py tiny --adapter sft=out/sft_dpo/sft/adapter --prompt "Reverse the words: red cup"
    python tools/generate.py tiny --adapter sft=out/sft_dpo/sft/adapter --input recipes/data/demo_eval.jsonl -o out/answers.jsonl
    python tools/generate.py tiny --adapter sft=out/sft_dpo/sft/adapter --adapter dpo=out/sft_dpo/final --chat

The active model is ``--use NAME`` (an adapter name, or ``base``), by default the last ``--adapter`` given.
Prompts go through the chat template as a user turn, as the recipes train them (``--raw``: as plain text).
``--input`` takes any prompt record format minift reads (prompt / instruction / messages ...); each output
line is the record plus ``completion``, ``finish_reason`` and ``model``. Batch mode resumes: records already
in ``-o`` are not generated again. In ``--chat``: ``/adapter NAME`` switches model, ``/reset`` forgets the
conversation, ``/quit`` (or Ctrl-D) leaves.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from tqdm import tqdm

from minift.data.formats import normalize_all
from minift.data.read import RecordError, load_records
from minift.infer.cli import (
    add_model_arguments,
    add_sampling_arguments,
    default_adapter,
    generator_from_args,
    sampling_from_args,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    add_sampling_arguments(parser)
    parser.add_argument("--use", default=None, help="the model to generate with: an --adapter name or 'base'")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompt", help="one prompt; the completion is streamed to stdout")
    mode.add_argument("--input", help="a JSONL (or any dataset file) of prompt records; needs -o")
    mode.add_argument("--chat", action="store_true", help="an interactive chat on the terminal")
    parser.add_argument("-o", "--output", help="JSONL written by --input mode (appended to when resuming)")
    parser.add_argument("--batch_size", type=int, default=16, help="prompts generated together in --input mode")
    parser.add_argument("--raw", action="store_true", help="use --prompt text as is, without the chat template")
    parser.add_argument("--system", default=None, help="a system message for --chat")
    args = parser.parse_args(argv)
    if args.input and not args.output:
        parser.error("--input needs -o OUT.jsonl")
    if args.batch_size < 1:
        parser.error("--batch_size must be at least 1")
    return args


def stream_to_stdout(_, text: str, done) -> None:
    sys.stdout.write(text + ("\n" if done else ""))
    sys.stdout.flush()


def finished_records(path: Path, n_records: int, model: str) -> set[int]:
    """Indices already written to ``path``; a torn last line (a killed run) is dropped from the file."""
    if not path.exists():
        return set()
    done, good_bytes = set(), 0
    with path.open("rb") as f:
        for number, line in enumerate(f, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if not line.endswith(b"\n"):  # the last line, cut short by a kill: generate it again
                    break
                raise ValueError(f"{path}:{number}: not JSON; this is not an output of generate.py") from None
            if row.get("model") != model:
                raise ValueError(f"{path}:{number} was generated with {row.get('model')!r}, this run uses {model!r}; "
                                 f"pass another -o (or --use {row.get('model')})")
            if not isinstance(row.get("index"), int) or not 0 <= row["index"] < n_records:
                raise ValueError(f"{path}:{number}: index {row.get('index')!r} is not a record of the input "
                                 f"({n_records} records); -o belongs to another input file")
            done.add(row["index"])
            good_bytes += len(line)
    if good_bytes < path.stat().st_size:
        with path.open("r+b") as f:
            f.truncate(good_bytes)
    return done


def batch(gen, args, params, records, prompts) -> None:
    out = Path(args.output)
    done = finished_records(out, len(prompts), args.use)
    todo = [i for i in range(len(prompts)) if i not in done]
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a", encoding="utf-8") as f, tqdm(total=len(prompts), initial=len(done), unit="prompt",
                                                    desc=f"generating ({args.use})") as bar:
        for start in range(0, len(todo), args.batch_size):
            chunk = todo[start: start + args.batch_size]
            completions = gen.generate([prompts[i].messages for i in chunk], params, adapter=args.use)
            for i, c in zip(chunk, completions):
                row = {**records[i].data, "index": i, "completion": c.text, "finish_reason": c.finish_reason,
                       "model": args.use}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())  # a kill after this loses nothing of the batch
            bar.update(len(chunk))
    print(f"{len(todo)} generated, {len(done)} already in {out}; {len(prompts)} records", file=sys.stderr)


def chat(gen, args, params) -> None:
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    print(f"chatting with {args.use} (models: {', '.join(gen.names)}); /adapter NAME, /reset, /quit", flush=True)
    while True:
        try:
            line = input(f"[{args.use}] you> ").strip()
        except EOFError:
            print()
            return
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return
        if line == "/reset":
            messages = list(start)
            print("(conversation cleared)", flush=True)
            continue
        if line.startswith("/adapter"):
            name = line.partition(" ")[2].strip()
            if name not in gen.names:
                print(f"no model named {name!r}; loaded: {', '.join(gen.names)}", flush=True)
            else:
                args.use = name
                print(f"(now {name})", flush=True)
            continue
        messages.append({"role": "user", "content": line})
        sys.stdout.write("assistant> ")
        [reply] = gen.generate([messages], params, adapter=args.use, on_text=stream_to_stdout)
        messages.append({"role": "assistant", "content": reply.text})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        params = sampling_from_args(args)
        records = load_records(args.input) if args.input else None
        # A bad record fails here, with file:line, before the model loads.
        prompts = normalize_all(records, "prompt").examples if records else None
        gen = generator_from_args(args)
        args.use = default_adapter(gen, args.use)
        if records:
            batch(gen, args, params, records, prompts)
        elif args.chat:
            chat(gen, args, params)
        else:
            gen.generate([args.prompt], params, adapter=args.use, chat=not args.raw, on_text=stream_to_stdout)
    except (ValueError, FileNotFoundError, RecordError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
