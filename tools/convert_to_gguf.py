"""Convert a Hugging Face model directory to GGUF for llama.cpp and Ollama (no llama.cpp needed).

    python tools/convert_to_gguf.py MODEL_DIR -o OUT.gguf [--outtype f32|f16|bf16|q8_0|q4_0]
                                    [--adapter DIR ...] [--lora-only] [--ollama]

MODEL_DIR is a saved HF model (safetensors), a ``.gguf`` file (dequantized once into minift's cache), ``tiny`` or
``smollm2``; architectures: llama, mistral, qwen2, gemma,
phi3, gpt2. ``--adapter`` merges PEFT-format adapters (minift's or peft's) in order while converting;
with ``--lora-only`` they are written instead as a llama.cpp LoRA adapter GGUF for the base MODEL_DIR
(``llama-cli -m base.gguf --lora OUT.gguf``). ``--ollama`` also writes a ``Modelfile`` next to
OUT.gguf (``ollama create NAME -f Modelfile``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from minift.export.gguf.convert import OUTTYPES, convert
from minift.model.from_gguf import is_gguf_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", help="HF model directory (config.json, *.safetensors, tokenizer files), a .gguf "
                                          "file, or 'tiny' for minift's built-in model")
    parser.add_argument("-o", "--output", required=True, help="the .gguf file to write")
    parser.add_argument("--outtype", choices=list(OUTTYPES), default="f16",
                        help="tensor type of the 2-D weights (default f16); norms and biases stay f32")
    parser.add_argument("--adapter", action="append", default=[], metavar="DIR",
                        help="a PEFT-format adapter to merge (repeat for several, applied in order)")
    parser.add_argument("--lora-only", action="store_true",
                        help="write the adapters as a llama.cpp LoRA GGUF instead of merging them")
    parser.add_argument("--ollama", action="store_true", help="also write an Ollama Modelfile next to the output")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model_dir = args.model_dir
    try:
        if model_dir in ("tiny", "smollm2") or is_gguf_file(model_dir):  # minift.model.load imports torch: only here
            from minift.model.load import resolve_model_path

            model_dir = resolve_model_path(model_dir)
        out = convert(model_dir, args.output, outtype=args.outtype, adapters=args.adapter,
                      lora_only=args.lora_only, ollama=args.ollama, progress=True)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    size = Path(out).stat().st_size / 2**20
    print(f"wrote {out} ({size:.1f} MiB)" + (f" and {Path(out).parent / 'Modelfile'}" if args.ollama else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
