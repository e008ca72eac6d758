"""GGUF export of a ~100M-parameter bf16 Llama: wall time and peak RSS, minift vs llama.cpp's converter (goal <= 0.5x).

    python tools/bench.py gguf [--reps 3] [--outtypes f16,bf16,q8_0] [--llama_cpp DIR]

The model is a random Llama (hidden 768, MLP 2048, 8 layers, 12 heads, vocab 32,000, untied head:
106M parameters) saved as bf16 safetensors in a temporary directory. Each conversion runs alone in a
fresh process (minift: ``tools/convert_to_gguf.py``; llama.cpp: ``convert_hf_to_gguf.py``), sides
alternating A B B A; wall time is spawn to exit (interpreter start and imports included, as a user
sees it) and peak RSS is the process's own ``VmHWM``, read at its exit. Medians over the repetitions.

llama.cpp's converter refuses byte-level BPE tokenizers it has no hash for (every tokenizer trained
from scratch), so the model gets a SentencePiece ``tokenizer.model``, which it reads without a hash
check. Its converter and the ``sentencepiece`` package it needs come from PyPI: the sources from the
``llama-cpp-python`` sdist (pinned below; only the converter files are kept) and ``sentencepiece``
installed into a private folder, both cached under ``$MINIFT_CACHE/bench-gguf``. ``--llama_cpp DIR``
uses a llama.cpp checkout instead. When neither can be had, minift runs alone and the reason is printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLAMA_CPP_SDIST = "llama-cpp-python==0.3.36"  # vendors llama.cpp's convert_hf_to_gguf.py, conversion/, gguf-py/
MODEL = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
             num_key_value_heads=12, max_position_embeddings=2048, tie_word_embeddings=False)
SP_VOCAB = 1000  # tokenizer.model pieces (the bundled corpus allows ~1,380); other rows become [PAD{i}]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reps", type=int, default=3, help="conversions per side and outtype (default 3)")
    parser.add_argument("--outtypes", default="f16,bf16,q8_0", help="comma-separated (default f16,bf16,q8_0)")
    parser.add_argument("--llama_cpp", default=None,
                        help="a llama.cpp directory with convert_hf_to_gguf.py (default: fetched from PyPI, cached)")


def _cache() -> Path:
    from minift.model.files import cache_dir

    return cache_dir() / "bench-gguf"


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "-q", *args], check=True, capture_output=True, text=True, timeout=900)


def llama_cpp_converter(args: argparse.Namespace) -> tuple[Path | None, str]:
    """(llama.cpp directory holding convert_hf_to_gguf.py, or None, and a line saying where it came from or why not)."""
    if args.llama_cpp:
        path = Path(args.llama_cpp)
        found = (path / "convert_hf_to_gguf.py").is_file()
        return (path, f"llama.cpp converter: {path}") if found else (None, f"no convert_hf_to_gguf.py in {path}")
    target = _cache() / "llama.cpp"
    if not (target / "convert_hf_to_gguf.py").is_file():
        try:
            with tempfile.TemporaryDirectory() as tmp:
                _pip("download", "--no-deps", "--no-binary", ":all:", LLAMA_CPP_SDIST, "-d", tmp)
                with tarfile.open(next(Path(tmp).glob("*.tar.gz"))) as sdist:
                    keep = [m for m in sdist.getmembers() if "/vendor/llama.cpp/" in m.name and
                            m.name.split("/vendor/llama.cpp/")[1].split("/")[0] in
                            ("convert_hf_to_gguf.py", "conversion", "gguf-py")]
                    for member in keep:
                        member.name = member.name.split("/vendor/llama.cpp/")[1]
                    sdist.extractall(target, members=keep, filter="data")
        except (subprocess.SubprocessError, OSError, StopIteration) as err:
            return None, f"llama.cpp's converter could not be obtained from PyPI ({LLAMA_CPP_SDIST}): {err}"
    return target, f"llama.cpp converter: {LLAMA_CPP_SDIST} sdist (vendor/llama.cpp), cached in {target}"


def sentencepiece_path() -> tuple[str | None, str]:
    """(a PYTHONPATH entry that provides sentencepiece, or None, and why not)."""
    target = _cache() / "site"
    if not (target / "sentencepiece").is_dir():
        try:
            _pip("install", "--target", str(target), "sentencepiece")
        except subprocess.SubprocessError as err:
            return None, f"the sentencepiece package could not be installed ({err})"
    return str(target), ""


def build_model(out: Path, sp_site: str | None) -> int:
    """Save the random bf16 Llama and, when sentencepiece is available, a trained SentencePiece BPE tokenizer;
    return the parameter count."""
    import json

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from minift.model.load import _tiny_corpus, tiny_model_dir

    torch.manual_seed(0)
    config = LlamaConfig(**MODEL, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    if sp_site is None:  # minift alone: the tiny byte-level BPE tokenizer will do
        for f in tiny_model_dir().glob("*"):
            if f.name.startswith(("tokenizer", "chat_template")):
                (out / f.name).write_bytes(f.read_bytes())
        return n_params
    (out / "corpus.txt").write_text(_tiny_corpus(), encoding="utf-8")
    train = ("import sentencepiece as spm, sys; spm.SentencePieceTrainer.train(input=sys.argv[1], "
             f"model_prefix=sys.argv[2], vocab_size={SP_VOCAB}, model_type='bpe', byte_fallback=True, "
             "minloglevel=2)")
    subprocess.run([sys.executable, "-c", train, str(out / "corpus.txt"), str(out / "tokenizer")], check=True,
                   env={**os.environ, "PYTHONPATH": sp_site}, timeout=600)
    (out / "corpus.txt").unlink()
    (out / "tokenizer.vocab").unlink()
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                           "unk_token": "<unk>", "add_bos_token": True}))
    return n_params


# Runs a script as __main__ and, at exit, writes the process's peak RSS (VmHWM) to a file. Measured
# inside the process because a forked child inherits the parent's peak in ru_maxrss (the parent here
# holds torch and the model it built), which would hide both sides' own peaks.
LAUNCHER = """import atexit, os, runpy, sys
report, script = sys.argv[1], sys.argv[2]
def write_peak():
    with open("/proc/self/status") as f:
        peak = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    with open(report, "w") as f:
        f.write(peak)
atexit.register(write_peak)
sys.argv = sys.argv[2:]
sys.path[0] = os.path.dirname(os.path.abspath(script))
runpy.run_path(script, run_name="__main__")
"""


def timed(cmd: list[str], env: dict, report: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of ``python SCRIPT ARGS...`` run to completion in a fresh process."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, str(report), *cmd], env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, timeout=1800, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr.decode()[-3000:]}")
    return wall, int(report.read_text()) / 1024  # VmHWM is in KiB


def run(args: argparse.Namespace) -> bool:
    """GGUF export of a 106M-parameter bf16 Llama: wall and peak RSS vs llama.cpp's converter (goal <= 0.5x each)."""
    outtypes = args.outtypes.split(",")
    llama_cpp, origin = llama_cpp_converter(args)
    sp_site, why = sentencepiece_path() if llama_cpp is not None else (None, "")
    if llama_cpp is not None and sp_site is None:
        llama_cpp, origin = None, f"llama.cpp's converter needs sentencepiece, and {why}"
    print(f"\n== gguf: random Llama (hidden {MODEL['hidden_size']}, MLP {MODEL['intermediate_size']}, "
          f"{MODEL['num_hidden_layers']} layers, {MODEL['num_attention_heads']} heads, vocab {MODEL['vocab_size']:,}, "
          f"untied head), bf16 safetensors ==")
    print(origin)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    sides = {"minift": lambda model, out, outtype: [str(ROOT / "tools" / "convert_to_gguf.py"), str(model), "-o",
                                                    str(out), "--outtype", outtype]}
    if llama_cpp is not None:
        sides["llama.cpp"] = lambda model, out, outtype: [str(llama_cpp / "convert_hf_to_gguf.py"), str(model),
                                                          "--outfile", str(out), "--outtype", outtype]
    side_env = {"minift": env, "llama.cpp": {**env, "PYTHONPATH": f"{sp_site}:{ROOT}"}}
    with tempfile.TemporaryDirectory(prefix="bench-gguf-") as tmp:
        model = Path(tmp) / "model"
        n_params = build_model(model, sp_site)
        size = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2**20
        tokenizer = "SentencePiece BPE" if sp_site else "byte-level BPE (tiny)"
        print(f"model: {n_params / 1e6:.0f}M parameters, {size:.0f} MiB of safetensors, {tokenizer} tokenizer; each "
              f"conversion in a fresh process, {args.reps} repetitions, sides alternating; medians\n")
        results = {(s, o): [] for s in sides for o in outtypes}
        for outtype in outtypes:
            for rep in range(args.reps):
                for side in (list(sides) if rep % 2 == 0 else list(sides)[::-1]):
                    out = Path(tmp) / f"{side}-{outtype}.gguf"
                    results[side, outtype].append(timed(sides[side](model, out, outtype), side_env[side],
                                                        Path(tmp) / "peak-rss"))
                    out.unlink()
    return _report(results, list(sides), outtypes)


def _report(results: dict, sides: list[str], outtypes: list[str]) -> bool:
    print(f"{'outtype':<9}" + "".join(f"{s + ' s':>14}{s + ' MiB':>16}" for s in sides)
          + ("" if len(sides) == 1 else f"{'wall ratio':>12}{'RSS ratio':>11}"))
    ok = True
    for outtype in outtypes:
        med = {s: (statistics.median(w for w, _ in results[s, outtype]), statistics.median(m for _, m in
                                                                                        results[s, outtype]))
               for s in sides}
        line = f"{outtype:<9}" + "".join(f"{med[s][0]:>14.2f}{med[s][1]:>16.0f}" for s in sides)
        if len(sides) > 1:
            wall, mem = (med["minift"][i] / med["llama.cpp"][i] for i in (0, 1))
            ok = ok and wall <= 0.5 and mem <= 0.5
            line += f"{wall:>11.2f}x{mem:>10.2f}x"
        print(line)
    if len(sides) == 1:
        print("\nno llama.cpp converter to compare with (see above): no ratios, no verdict")
        return False
    print(f"\nminift / llama.cpp wall and peak RSS <= 0.5x for every outtype: {'PASS' if ok else 'FAIL'}")
    return ok


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    sys.exit(0 if run(parser.parse_args()) else 1)
