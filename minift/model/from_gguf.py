"""A GGUF file as a starting point: dequantized once into a cached safetensors model directory.

    python recipes/sft.py --model_name_or_path path/model.gguf

transformers' GGUF loader reads the file (every architecture and tensor type it knows); minift writes the model it
returns, with the file's tokenizer and chat template, into ``cache_dir()/gguf-<sha256 of the file>`` and hands that
directory to every later step. So the second run starts at once, and training, merging, serving and exporting take
the path a normal model takes. The file is checked before the slow part: a file that is not a GGUF, a LoRA adapter
GGUF, an architecture or a tensor type the loader cannot read is one error naming the file.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from minift.config import ConfigError
from minift.export.gguf.reader import READABLE_TYPES, GGUFFormatError, missing_bytes, read_header
from minift.model.files import cache_dir, save_on_any_process, set_usual_modes

logger = logging.getLogger(__name__)
_FP32_LIMIT = 2_000_000_000  # parameters: up to here the cache keeps the exact dequantized float32 weights


def is_gguf_file(path: str | Path) -> bool:
    """Whether ``path`` names a file with the ``.gguf`` suffix (what ``--model_name_or_path`` treats as GGUF)."""
    path = Path(path).expanduser()
    return path.suffix.lower() == ".gguf" and path.is_file()


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


@functools.lru_cache(maxsize=16)
def _stat_sha256(path: Path, size: int, mtime_ns: int) -> str:
    """:func:`file_sha256`, once per version of a file in this process: a run resolves its model several times
    (tokenizer, model, adapters' base), and a multi-GB GGUF takes seconds to hash."""
    return file_sha256(path)


def check_gguf(path: Path) -> tuple[str, int]:
    """The file's architecture and parameter count, or a ConfigError saying why transformers cannot load it."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        header = read_header(path)
    except GGUFFormatError as err:
        raise ConfigError(str(err)) from None
    if header.metadata.get("general.type") == "adapter":
        raise ConfigError(f"{path} is a LoRA adapter GGUF, not a model; pass the base model's GGUF (or directory)")
    arch = header.metadata.get("general.architecture")
    known = sorted(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))
    if arch not in known:
        raise ConfigError(f"{path}: architecture {arch!r} is not one transformers' GGUF loader reads "
                         f"({', '.join(known)}); convert the original model instead")
    bad = sorted({t.type_name for t in header.tensors if t.type_id not in READABLE_TYPES})
    if bad:
        raise ConfigError(f"{path}: tensor type(s) {', '.join(bad)} cannot be dequantized by transformers' GGUF "
                         f"loader; re-quantize the model to a common type (q8_0, q4_k_m, f16)")
    missing = missing_bytes(header)
    if missing:
        raise ConfigError(f"{path}: the file is truncated: its tensors need {missing:,} bytes more than its "
                         f"{header.file_size:,}; download or copy it again")
    if importlib.util.find_spec("gguf") is None:  # transformers' loader reads the tensors with it
        raise ConfigError(f"{path}: reading a GGUF model needs the gguf package: pip install gguf (or the [gguf] extra "
                         f"of minift: pip install -e '.[gguf]' in the checkout)")
    return arch, sum(t.n_elements for t in header.tensors)


def gguf_model_dir(path: str | Path) -> Path:
    """The cached model directory of a GGUF file, written on first use (under a lock, so that the processes of
    one launch convert it once)."""
    import torch


    path = Path(path).expanduser().resolve()
    stat = path.stat()
    target = cache_dir() / f"gguf-{_stat_sha256(path, stat.st_size, stat.st_mtime_ns)[:16]}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be converting the same file: wait for it
        if (target / "config.json").is_file():
            return target
        arch, n_params = check_gguf(path)
        dtype = torch.float32 if n_params <= _FP32_LIMIT else torch.bfloat16
        logger.info("dequantizing %s (%s, %.0fM parameters) into %s as %s; later runs reuse it", path.name, arch,
                    n_params / 1e6, target, str(dtype).replace("torch.", ""))
        tmp = Path(tempfile.mkdtemp(prefix=".gguf-build-", dir=target.parent))
        try:
            _dequantize(path, tmp, dtype)
            set_usual_modes(tmp)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _dequantize(path: Path, out: Path, dtype) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    # The loaded model is marked as quantized with gguf, which save_pretrained refuses; its weights are plain tensors.
    del model.config.quantization_config
    model.hf_quantizer, model.is_quantized = None, False
    model.config.name_or_path = str(path)
    save_on_any_process(model, out)
    tokenizer.save_pretrained(out)
    (out / "SOURCE").write_text(f"dequantized by minift from {path}\n", encoding="utf-8")
