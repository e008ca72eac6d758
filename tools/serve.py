"""Serve a base model and its adapters over an OpenAI-compatible HTTP API.

    python tools/serve.py tiny --adapter sft=out/sft_dpo/sft/adapter --adapter final=out/sft_dpo/final --port 8000

Then any OpenAI client talks to it: ``OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")``, with
``model="tiny"`` for the base or an adapter's name (``GET /v1/models`` lists them). A trainer can push a new
adapter with ``POST /v1/load_lora_adapter {"lora_name": ..., "lora_path": ...}`` (and unload one), as on vLLM.
The server binds 127.0.0.1 unless ``--host`` says otherwise; with ``--api_key`` (or ``MINIFT_API_KEY``) every
request must send ``Authorization: Bearer KEY``. Built on Python's http.server: no extra dependency.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from minift.infer.cli import add_model_arguments, generator_from_args
from minift.infer.server import APIServer, ServerConfig


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed at start)")
    parser.add_argument("--served_model_name", default=None, help="the base model's name for clients "
                                                                 "(default: MODEL as given)")
    parser.add_argument("--api_key", default=os.environ.get("MINIFT_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $MINIFT_API_KEY; unset: no key)")
    parser.add_argument("--max_batch_size", type=int, default=32, help="completions decoded together at most")
    parser.add_argument("--batch_wait_ms", type=float, default=5.0,
                        help="how long the first request of a batch waits for others to join (default 5)")
    parser.add_argument("--max_tokens", type=int, default=256, help="completion length when a request gives none")
    parser.add_argument("--max_model_len", type=int, default=None,
                        help="prompt + completion limit (default: the model's max_position_embeddings)")
    parser.add_argument("--max_request_bytes", type=int, default=1 << 20, help="larger bodies get 413")
    parser.add_argument("--log_requests", action="store_true", help="log every request line")
    args = parser.parse_args(argv)
    for name in ("max_batch_size", "max_tokens", "max_request_bytes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.batch_wait_ms < 0 or not 0 <= args.port < 65536:
        parser.error("--batch_wait_ms must be >= 0 and --port in [0, 65535]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.log_requests else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s")
    try:
        gen = generator_from_args(args)
        config = ServerConfig(served_model_name=args.served_model_name or args.model, api_key=args.api_key,
                              max_batch_size=args.max_batch_size, batch_wait_s=args.batch_wait_ms / 1000,
                              max_tokens=args.max_tokens, max_model_len=args.max_model_len,
                              max_request_bytes=args.max_request_bytes)
        server = APIServer(gen, config, args.host, args.port)
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"serving {', '.join(server.model_ids())} at {server.url}" + (" (API key required)" if args.api_key else ""),
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
