"""Weight files: checks of safetensors files before a loader reads them (one error naming the file and what is
wrong), the usual permissions on what minift writes, and where it keeps what it builds (:func:`cache_dir`).

A safetensors file is an 8-byte header length, a JSON header (tensor name -> dtype, shape, data offsets) and the
data. What users meet instead: a Git LFS pointer (a clone without ``git lfs``), a file cut short by a failed
download or copy, or a damaged header. The safetensors library reports these as bare ``SafetensorError``s (or
reads past the end); these checks read the header only, so they cost milliseconds for any model size.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from minift.config import ConfigError

HEADER_LIMIT = 100 << 20  # the safetensors library's own limit on the header's length
_LFS_POINTER = b"version https://git-lfs"


def cache_dir() -> Path:
    """Where built artifacts live: ``$MINIFT_CACHE``, else ``$XDG_CACHE_HOME/minift`` or ``~/.cache/minift``."""
    if os.environ.get("MINIFT_CACHE"):
        return Path(os.environ["MINIFT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "minift"


def check_safetensors(path: str | Path) -> None:
    """Raise ConfigError when ``path`` is not a whole safetensors file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if head + f.read(len(_LFS_POINTER) - 8) == _LFS_POINTER:
            raise ConfigError(f"{path} is a Git LFS pointer, not the weights: run `git lfs pull` in the repository "
                              f"it came from (or download the file itself)")
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if n is None or n > min(size - 8, HEADER_LIMIT):
            raise ConfigError(f"{path} is not a whole safetensors file: its header length "
                              f"{'is missing' if n is None else f'({n:,} bytes) does not fit the file ({size:,} bytes)'}"
                              f"; the file is truncated or corrupt: download or save it again")
        f.seek(8)
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError) as err:
            raise ConfigError(f"{path} is not a safetensors file: its header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise ConfigError(f"{path} is not a safetensors file: its header is a JSON {type(header).__name__}")
    data_bytes, needed = size - 8 - n, 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise ConfigError(f"{path}: tensor {key} has no valid data_offsets ({offsets!r}); the file is corrupt")
        needed = max(needed, offsets[1])
    if needed > data_bytes:
        raise ConfigError(f"{path} is truncated: its tensors need {needed:,} bytes of data, the file holds "
                          f"{data_bytes:,}; download or save it again")


def check_model_dir(model_dir: str | Path) -> None:
    """:func:`check_safetensors` for each weight file of a local model directory."""
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        check_safetensors(path)


def save_on_any_process(model, out_dir: str | Path) -> None:
    """``model.save_pretrained(out_dir)`` from whichever process calls it. Inside a process group transformers
    writes the weights from rank 0 only (the tokenizer and config from every rank), so a cache that each process
    of a launch builds for itself (the tiny model, a dequantized GGUF) lacked its weights on the other ranks."""
    model.should_save_on_this_rank = lambda is_main_process: True
    try:
        model.save_pretrained(out_dir)
    finally:
        del model.should_save_on_this_rank


def set_usual_modes(path: str | Path) -> None:
    """Give ``path`` and everything under it the modes the umask allows (0644 / 0755 under umask 022).

    ``tempfile.mkdtemp`` creates 0700 directories and the safetensors library 0600 files, so a model or adapter
    written through a temp directory would be unreadable to other users and to a server running as another one.
    """
    umask = os.umask(0)
    os.umask(umask)
    path = Path(path)
    for item in (path, *path.rglob("*")) if path.is_dir() else (path,):
        if not item.is_symlink():
            item.chmod((0o777 if item.is_dir() else 0o666) & ~umask)
