"""The tensors of a model directory's safetensors files, read with ``mmap`` and numpy (no torch: its import
alone costs ~200 MB, and safetensors' numpy backend has no bf16). The format is an 8-byte header length, a
JSON header (name -> dtype, shape, data offsets) and raw little-endian data. Headers are untrusted input:
each is checked whole before any data is read."""

from __future__ import annotations

import json
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minift.export.gguf.writer import TensorType, bf16_bits_to_f32

DTYPES = {"F32": (np.float32, TensorType.F32), "F16": (np.float16, TensorType.F16),
          "BF16": (np.uint16, TensorType.BF16)}
_RELEASE_ALIGN = 1 << 20
HEADER_LIMIT = 100 << 20  # safetensors' own limit on the JSON header's length
_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
                "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _header_problem(entry, data_bytes: int) -> str | None:
    """What is wrong with one tensor's header entry (None: nothing), given the data section's size."""
    if not isinstance(entry, dict):
        return f"its entry is a JSON {type(entry).__name__}, not an object"
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _DTYPE_SIZES:
        return f"unknown dtype {dtype!r}"
    if dtype not in DTYPES:
        return (f"dtype {dtype}: GGUF export reads F32, F16 and BF16 weights (dequantize a quantized checkpoint "
                f"first)")
    if not isinstance(shape, list) or not 1 <= len(shape) <= 2 or not all(is_int(d) and d > 0 for d in shape):
        return f"shape {shape!r} is not one or two positive integers"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_bytes):
        return f"data_offsets {offsets!r} are not two offsets inside the data section (0 to {data_bytes})"
    if offsets[1] - offsets[0] != math.prod(shape) * _DTYPE_SIZES[dtype]:
        return (f"data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes, but shape {shape} of {dtype} needs "
                f"{math.prod(shape) * _DTYPE_SIZES[dtype]}")
    return None


@dataclass(frozen=True)
class SourceTensor:
    key: str
    file: Path
    dtype: str  # "F32", "F16" or "BF16"
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file


class SafetensorsSource:
    """The tensors of a model directory's safetensors file(s), read through read-only memory maps."""

    def __init__(self, model_dir: Path):
        self.tensors: dict[str, SourceTensor] = {}
        self._maps: dict[Path, mmap.mmap] = {}
        for path in self._files(model_dir):
            self._read_header(path)

    @staticmethod
    def _files(model_dir: Path) -> list[Path]:
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
            files = [model_dir / name for name in sorted(set(weight_map.values()))]
            missing = [f for f in files if not f.is_file()]
            if missing:
                raise FileNotFoundError(f"{index} lists {missing[0].name}, which is missing; the download or save "
                                        f"was incomplete")
            return files
        files = sorted(p for p in model_dir.glob("*.safetensors") if p.name != "adapter_model.safetensors")
        if not files:
            hint = " (only safetensors are read: re-save with save_pretrained)" if any(model_dir.glob("*.bin")) else ""
            raise FileNotFoundError(f"{model_dir} has no model weights (*.safetensors){hint}")
        return files

    def _read_header(self, path: Path) -> None:
        """Check the whole header before a byte of data is read: a JSON object of tensors, each with a known
        dtype, a shape of positive integers and data offsets inside the data section, sized shape x dtype, no
        two overlapping. The file is untrusted: one error names it and the tensor, never a crash."""
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            n = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else None
            if n is None or n > min(size - 8, HEADER_LIMIT):
                raise ValueError(f"{path} is not a safetensors file: its header length "
                                 f"{'is missing' if n is None else f'{n} does not fit the file ({size} bytes)'}")
            try:
                header = json.loads(f.read(n))
            except (ValueError, RecursionError) as err:  # JSON and UTF-8 errors are ValueErrors
                raise ValueError(f"{path} is not a safetensors file: its header is not JSON ({err})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{path} is not a safetensors file: its header is a JSON {type(header).__name__}, "
                             f"not an object")
        data_start, spans = 8 + n, []
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            problem = _header_problem(entry, size - data_start)
            if problem:
                raise ValueError(f"{path}: tensor {key}: {problem}; the file is corrupt or was not written by "
                                 f"safetensors")
            begin, end = entry["data_offsets"]
            spans.append((begin, end, key))
            self.tensors[key] = SourceTensor(key, path, entry["dtype"], tuple(entry["shape"]), data_start + begin)
        spans.sort()
        for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
            if begin < end:
                raise ValueError(f"{path}: tensors {first} and {second} overlap in the data section; the file is "
                                 f"corrupt or was not written by safetensors")

    def _map(self, path: Path) -> mmap.mmap:
        if path not in self._maps:
            with open(path, "rb") as f:
                self._maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._maps[path]

    @staticmethod
    def rows_and_cols(t: SourceTensor) -> tuple[int, int]:
        return t.shape[0] if t.shape else 1, math.prod(t.shape[1:])

    def read(self, t: SourceTensor, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as float32 ``[stop - start, cols]`` (1-D tensors: one value per row)."""
        dtype = DTYPES[t.dtype][0]
        _, cols = self.rows_and_cols(t)
        view = np.frombuffer(self._map(t.file), dtype=dtype, count=(stop - start) * cols,
                             offset=t.offset + start * cols * np.dtype(dtype).itemsize).reshape(stop - start, cols)
        if t.dtype == "BF16":
            return bf16_bits_to_f32(view)
        return view.astype(np.float32, copy=False)

    def raw(self, t: SourceTensor, start: int, stop: int) -> memoryview:
        return memoryview(self._map(t.file))[t.offset + start:t.offset + stop]

    def release(self, t: SourceTensor, start: int, stop: int) -> None:
        """Drop the mapped pages of bytes ``start:stop`` of ``t`` from this process (they stay in the page cache).

        A page fault also maps the cached pages around it (the kernel's fault-around, 64 KiB by default),
        including ones released before, so the range is widened back to a 1 MiB boundary.
        """
        first = (t.offset + start) // _RELEASE_ALIGN * _RELEASE_ALIGN
        self._map(t.file).madvise(mmap.MADV_DONTNEED, first, t.offset + stop - first)
