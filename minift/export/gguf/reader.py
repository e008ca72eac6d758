"""Reading a GGUF file's header (metadata and tensor infos, the layout in ``writer.py``) without its tensor data.

minift checks a GGUF model before transformers' loader dequantizes it (``minift.model.from_gguf``): the magic, the
file type, the architecture, every tensor's type, and that the file holds every tensor's bytes. Every length read
from the file is checked against the file's size first, so a truncated or hostile header is an error, not a huge
allocation.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from minift.export.gguf.writer import GGUF_MAGIC, DEFAULT_ALIGNMENT, ValueType

# ggml type id -> (name, values per block, bytes per block): the types the gguf package's dequantizer reads,
# which is what transformers' GGUF loader calls (tests/test_from_gguf.py checks this table against gguf).
READABLE_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 30: ("BF16", 1, 2),
    2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    29: ("IQ1_M", 256, 56), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
}
# Types a GGUF may hold that no dequantizer reads, named in the error.
OTHER_TYPES = {9: "Q8_1", 15: "Q8_K", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64"}

_SCALARS = {ValueType.UINT8: "<B", ValueType.INT8: "<b", ValueType.UINT16: "<H", ValueType.INT16: "<h",
            ValueType.UINT32: "<I", ValueType.INT32: "<i", ValueType.FLOAT32: "<f", ValueType.BOOL: "<?",
            ValueType.UINT64: "<Q", ValueType.INT64: "<q", ValueType.FLOAT64: "<d"}


class GGUFFormatError(ValueError):
    """The file is not a GGUF file this reader understands, or it ends too early; the message names the file."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: innermost dimension first
    type_id: int
    offset: int  # from the start of the data section

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def type_name(self) -> str:
        known = READABLE_TYPES.get(self.type_id)
        return known[0] if known else OTHER_TYPES.get(self.type_id, f"type id {self.type_id}")


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    metadata: dict[str, object]  # arrays come back as lists
    tensors: list[TensorInfo]
    data_offset: int
    file_size: int


class _Cursor:
    """Reads little-endian values from a buffer, never past its end."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.size, self.path = buf, 0, len(buf), path

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise GGUFFormatError(f"{self.path}: the header ends early at byte {self.pos} of {self.size}: the file "
                                  f"is truncated or its header is corrupt")
        self.pos += n
        return self.buf[self.pos - n:self.pos]

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        raw = self.take(self.unpack("<Q"))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise GGUFFormatError(f"{self.path}: a string at byte {self.pos - len(raw)} is not UTF-8 "
                                  f"({err})") from None

    def value(self, vtype: int):
        if vtype == ValueType.STRING:
            return self.string()
        if vtype == ValueType.ARRAY:
            element_type, count = self.unpack("<I"), self.unpack("<Q")
            if element_type == ValueType.ARRAY:
                raise GGUFFormatError(f"{self.path}: nested metadata arrays are not supported")
            if element_type in _SCALARS:  # check the length before allocating anything
                fmt = _SCALARS[ValueType(element_type)]
                raw = self.take(count * struct.calcsize(fmt))
                return list(struct.unpack(f"<{count}{fmt[1]}", raw))
            return [self.value(element_type) for _ in range(min(count, self.size))]
        if vtype not in _SCALARS:
            raise GGUFFormatError(f"{self.path}: unknown metadata value type {vtype} at byte {self.pos - 4}")
        return self.unpack(_SCALARS[ValueType(vtype)])


def read_header(path: str | Path) -> GGUFHeader:
    """The metadata and tensor infos of a GGUF file; raises GGUFFormatError for anything it cannot read."""
    path = Path(path)
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise GGUFFormatError(f"{path} is not a GGUF file (it does not start with b'GGUF')")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(_Cursor(buf, path))


def _parse(cur: _Cursor) -> GGUFHeader:
    cur.take(4)
    version = cur.unpack("<I")
    if version not in (2, 3):
        raise GGUFFormatError(f"{cur.path}: GGUF version {version} is not one this reader knows (2 or 3)")
    n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
    metadata = {}
    for _ in range(min(n_kv, cur.size)):  # each entry takes bytes, so a huge count ends as "truncated"
        key = cur.string()
        metadata[key] = cur.value(cur.unpack("<I"))
    tensors = []
    for _ in range(min(n_tensors, cur.size)):
        name = cur.string()
        n_dims = cur.unpack("<I")
        shape = struct.unpack(f"<{n_dims}Q", cur.take(8 * n_dims))
        tensors.append(TensorInfo(name, shape, cur.unpack("<I"), cur.unpack("<Q")))
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT)) or DEFAULT_ALIGNMENT
    data_offset = (cur.pos + alignment - 1) // alignment * alignment
    return GGUFHeader(version, metadata, tensors, data_offset, cur.size)


def tensor_nbytes(info: TensorInfo) -> int | None:
    """Bytes of a tensor's data, or None for a type this reader has no block size for."""
    known = READABLE_TYPES.get(info.type_id)
    if known is None:
        return None
    _, per_block, block_bytes = known
    return info.n_elements // per_block * block_bytes


def missing_bytes(header: GGUFHeader) -> int:
    """How many bytes the file lacks for the tensors its header lists (0 when it holds them all)."""
    end = max((header.data_offset + t.offset + (tensor_nbytes(t) or 0) for t in header.tensors),
              default=header.data_offset)
    return max(0, end - header.file_size)
