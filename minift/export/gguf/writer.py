"""GGUF v3 files (llama.cpp's format): typed metadata, tensor infos, aligned data, and minift's quantizers.

File layout, all little-endian::

    b"GGUF", u32 version (3), u64 tensor count, u64 metadata count
    metadata:     string key, u32 value type, value                      (repeated)
    tensor infos: string name, u32 n_dims, u64 dims (innermost first), u32 type, u64 offset
    zero padding to ``general.alignment`` (32), then the tensors' bytes, each padded to the alignment

A string is a u64 byte length and UTF-8 bytes; an array is a u32 element type, a u64 count and the
elements. Each tensor's offset (from the start of the data) is the running sum of the previous
tensors' padded sizes. A tensor's bytes are its PyTorch row-major buffer; only the dims are listed
reversed. The writer streams each tensor's bytes from a callable, so a converter never holds more
than one tensor's worth of output.

Quantizers (bit-identical to ggml's reference C code):

- Q8_0, blocks of 32 values -> f16 ``d`` + 32 int8: ``d = max|x| / 127``, ``q = round(x * (1/d))`` with
  halves rounded away from zero, computed in f32.
- Q4_0, blocks of 32 -> f16 ``d`` + 16 bytes: ``m`` = the value of largest magnitude (first one on
  ties), ``d = m / -8``, ``q = min(15, trunc(x * (1/d) + 8.5))``; byte j holds element j in its low
  nibble and element j + 16 in its high nibble.
- BF16: round to nearest even, NaN kept NaN (quiet bit set). F16: numpy's round to nearest even.
"""

from __future__ import annotations

import math
import os
import struct
import tempfile
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from tqdm import tqdm

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
DEFAULT_ALIGNMENT = 32
MAX_NAME_BYTES = 63  # llama.cpp's GGML_MAX_NAME is 64 including the terminating NUL


class ValueType(IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


_SCALAR_DTYPES = {
    ValueType.UINT8: "<u1", ValueType.INT8: "<i1", ValueType.UINT16: "<u2", ValueType.INT16: "<i2",
    ValueType.UINT32: "<u4", ValueType.INT32: "<i4", ValueType.FLOAT32: "<f4", ValueType.BOOL: "?",
    ValueType.UINT64: "<u8", ValueType.INT64: "<i8", ValueType.FLOAT64: "<f8",
}


class TensorType(IntEnum):
    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q8_0 = 8
    BF16 = 30


# type -> (values per block, bytes per block)
BLOCK = {TensorType.F32: (1, 4), TensorType.F16: (1, 2), TensorType.BF16: (1, 2),
         TensorType.Q8_0: (32, 34), TensorType.Q4_0: (32, 18)}

# A metadata value: (type, value); arrays are (ValueType.ARRAY, (element type, list of values)).
Value = tuple[ValueType, object]


def u32(v: int) -> Value:
    return ValueType.UINT32, int(v)


def i32(v: int) -> Value:
    return ValueType.INT32, int(v)


def f32(v: float) -> Value:
    return ValueType.FLOAT32, float(v)


def boolean(v: bool) -> Value:
    return ValueType.BOOL, bool(v)


def string(v: str) -> Value:
    return ValueType.STRING, str(v)


def array(element_type: ValueType, values: Iterable) -> Value:
    return ValueType.ARRAY, (element_type, list(values))


@dataclass
class Tensor:
    """One tensor to write: GGUF name, PyTorch-order shape, type, and a callable yielding its bytes in order.

    ``data()`` yields bytes-like chunks (bytes, memoryviews or C-contiguous numpy arrays) that add up
    to exactly ``tensor_nbytes(type, shape)`` bytes.
    """

    name: str
    shape: tuple[int, ...]
    type: TensorType
    data: Callable[[], Iterable]


def tensor_nbytes(ttype: TensorType, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of ``shape`` (PyTorch order) stored as ``ttype``; rows must fill whole blocks."""
    per_block, block_bytes = BLOCK[ttype]
    if shape[-1] % per_block:
        raise ValueError(f"rows of {shape[-1]} values do not split into {ttype.name} blocks of {per_block}")
    return math.prod(shape) // per_block * block_bytes


def _padded(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


# ----------------------------------------------------------------------------- encoding


def _string_bytes(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def encode_value(vtype: ValueType, value: object) -> bytes:
    """The bytes of one metadata value (without its type tag)."""
    if vtype == ValueType.STRING:
        return _string_bytes(value)
    if vtype == ValueType.ARRAY:
        element_type, items = value
        head = struct.pack("<IQ", element_type, len(items))
        if element_type == ValueType.STRING:
            return head + b"".join(_string_bytes(s) for s in items)
        if element_type == ValueType.ARRAY:
            raise ValueError("nested arrays are not supported")
        return head + np.asarray(items, dtype=_SCALAR_DTYPES[element_type]).tobytes()
    return np.asarray(value, dtype=_SCALAR_DTYPES[vtype]).tobytes()


def _check_value(key: str, vtype: ValueType, value: object) -> None:
    """Reject values that do not fit their declared type (numpy would wrap or round them silently)."""
    element_type, items = value if vtype == ValueType.ARRAY else (vtype, [value])
    if element_type in (ValueType.STRING, ValueType.BOOL, ValueType.FLOAT32, ValueType.FLOAT64):
        return
    info = np.iinfo(_SCALAR_DTYPES[element_type])
    bad = next((v for v in items if not (isinstance(v, (int, np.integer)) and info.min <= v <= info.max)), None)
    if bad is not None:
        raise ValueError(f"metadata {key!r}: {bad!r} is not a {element_type.name} ({info.min}..{info.max})")


def header_bytes(metadata: dict[str, Value], tensors: list[Tensor], alignment: int) -> bytes:
    """Everything before the tensor data: header, metadata, tensor infos and the padding after them."""
    parts = [GGUF_MAGIC, struct.pack("<IQQ", GGUF_VERSION, len(tensors), len(metadata))]
    for key, (vtype, value) in metadata.items():
        _check_value(key, vtype, value)
        parts += [_string_bytes(key), struct.pack("<I", vtype), encode_value(vtype, value)]
    offset = 0
    for t in tensors:
        dims = tuple(reversed(t.shape))  # ggml lists the innermost (contiguous) dimension first
        parts += [_string_bytes(t.name), struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, t.type, offset)]
        offset += _padded(tensor_nbytes(t.type, t.shape), alignment)
    header = b"".join(parts)
    return header + bytes(_padded(len(header), alignment) - len(header))


def _check_names(tensors: list[Tensor]) -> None:
    seen = set()
    for t in tensors:
        size = len(t.name.encode("utf-8"))
        if size > MAX_NAME_BYTES:
            raise ValueError(f"tensor name {t.name!r} is {size} bytes; GGUF (llama.cpp's GGML_MAX_NAME) allows at "
                             f"most {MAX_NAME_BYTES}. Map the tensor to a shorter name.")
        if t.name in seen:
            raise ValueError(f"tensor {t.name!r} appears twice; each GGUF tensor name must be unique")
        seen.add(t.name)


def write_gguf(path: str | Path, metadata: dict[str, Value], tensors: list[Tensor], *, progress: bool = False) -> Path:
    """Write a GGUF file atomically: a temp file in the same directory, renamed into place when complete.

    Nothing is left at ``path`` (nor a temp file) when anything fails. ``progress`` shows a tqdm bar
    of bytes written.
    """
    path = Path(path)
    _check_names(tensors)
    alignment = int(metadata.get("general.alignment", (ValueType.UINT32, DEFAULT_ALIGNMENT))[1])
    header = header_bytes(metadata, tensors, alignment)
    sizes = [tensor_nbytes(t.type, t.shape) for t in tensors]
    total = len(header) + sum(_padded(n, alignment) for n in sizes)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=path.name,
                                            disable=not progress) as bar:
            f.write(header)
            bar.update(len(header))
            for t, size in zip(tensors, sizes):
                written = 0
                for chunk in t.data():
                    n = memoryview(chunk).nbytes
                    f.write(chunk)
                    written += n
                    bar.update(n)
                if written != size:
                    raise RuntimeError(f"tensor {t.name}: {written} bytes were produced, {size} expected")
                f.write(bytes(_padded(size, alignment) - size))
                bar.update(_padded(size, alignment) - size)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ----------------------------------------------------------------------------- quantizers


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 stored as uint16 -> float32 (exact: bf16 is the top half of an f32)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounding to nearest even; NaN stays NaN with the quiet bit set."""
    n = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    nan = (n & 0x7FFFFFFF) > 0x7F800000
    n = np.where(nan, (n & 0xFFFF0000) | 0x00400000, n)
    # After the NaN substitution n + 0x8000 cannot overflow 32 bits (the largest is -inf's 0xff800000).
    return ((n + (0x7FFF + ((n >> 16) & 1))) >> 16).astype(np.uint16)


def _round_half_away(v: np.ndarray) -> np.ndarray:
    # C's roundf. np.rint rounds halves to even and trunc(v + 0.5) is off just below 0.5 (the add rounds up).
    a = np.abs(v)
    whole = np.floor(a)
    return np.copysign(whole + (a - whole >= 0.5), v)


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """float32 ``[rows, cols]`` (cols % 32 == 0) -> uint8 ``[rows, cols / 32 * 34]`` Q8_0 blocks."""
    blocks = np.asarray(x, dtype=np.float32).reshape(-1, 32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    out = np.empty((blocks.shape[0], 34), dtype=np.uint8)
    out[:, :2] = d.astype(np.float16).view(np.uint8)
    out[:, 2:] = _round_half_away(blocks * inv).astype(np.int8).view(np.uint8)
    return out.reshape(x.shape[0], -1)


def quantize_q4_0(x: np.ndarray) -> np.ndarray:
    """float32 ``[rows, cols]`` (cols % 32 == 0) -> uint8 ``[rows, cols / 32 * 18]`` Q4_0 blocks."""
    blocks = np.asarray(x, dtype=np.float32).reshape(-1, 32)
    first_max = np.abs(blocks).argmax(axis=1)[:, None]  # argmax takes the first of equal magnitudes, as ggml
    d = np.take_along_axis(blocks, first_max, axis=1) / np.float32(-8)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    # x * inv + 8.5 lies in [0.5, 16.5], so the cast truncates exactly like C's (int8_t) cast.
    q = np.minimum((blocks * inv + np.float32(8.5)).astype(np.uint8), 15)
    out = np.empty((blocks.shape[0], 18), dtype=np.uint8)
    out[:, :2] = d.astype(np.float16).view(np.uint8)
    out[:, 2:] = q[:, :16] | (q[:, 16:] << 4)
    return out.reshape(x.shape[0], -1)


def encode_rows(x: np.ndarray, ttype: TensorType) -> np.ndarray:
    """float32 ``[rows, cols]`` -> the bytes of those rows in ``ttype`` (an array to write as is)."""
    if ttype == TensorType.F32:
        return np.ascontiguousarray(x, dtype=np.float32)
    if ttype == TensorType.F16:
        return np.ascontiguousarray(x).astype(np.float16)
    if ttype == TensorType.BF16:
        return f32_to_bf16_bits(x)
    if ttype == TensorType.Q8_0:
        return quantize_q8_0(x)
    if ttype == TensorType.Q4_0:
        return quantize_q4_0(x)
    raise ValueError(f"unknown tensor type {ttype!r}")
