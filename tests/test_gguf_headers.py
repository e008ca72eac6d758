"""The GGUF converter reads untrusted files: every safetensors header is checked whole before any data is
read. Each hostile header the converter once trusted fails with one error naming the file and tensor (and
leaves no output); a property test feeds it random and mutated headers: it refuses clearly or reads exactly
the bytes the header describes, never outside the file, never allocating much more than the file's size."""

from __future__ import annotations

import json
import re
import shutil
import struct
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minift.export.gguf.convert import convert
from minift.export.gguf.source import SafetensorsSource
from minift.export.gguf.writer import bf16_bits_to_f32


def split(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def edited(tiny_dir: Path, root: Path, name: str, edit) -> Path:
    """A copy of the tiny model whose model.safetensors header is ``edit(header)`` (data unchanged)."""
    model = root / name
    shutil.copytree(tiny_dir, model)
    path = model / "model.safetensors"
    header, data = split(path)
    edit(header)
    path.write_bytes(join(header, data))
    return model


EMBED = "model.embed_tokens.weight"
Q0, K0 = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"


def _overlap(h):
    h[K0]["data_offsets"] = [h[Q0]["data_offsets"][0], h[Q0]["data_offsets"][0] + 64 * 32 * 4]


def _reshape(h):
    h[Q0]["shape"] = [32, 128]  # the same bytes, another shape


def _rename(h):
    h["model.layers.9.self_attn.q_proj.weight"] = h.pop(Q0)


HOSTILE = {  # header edit, the message after "<file>: "
    "overlapping offsets": (_overlap, r"tensors .* and .* overlap in the data section"),
    "negative offset": (lambda h: h[Q0].update(data_offsets=[-16, h[Q0]["data_offsets"][1]]),
                        rf"tensor {Q0}: data_offsets \[-16, \d+\] are not two offsets inside the data section"),
    "2^40 embedding rows": (lambda h: h[EMBED].update(shape=[2 ** 40, 64]),
                            rf"tensor {EMBED}: data_offsets \[\d+, \d+\] hold \d+ bytes, but shape "
                            rf"\[1099511627776, 64\] of F32 needs 281474976710656"),
    "missing dtype": (lambda h: h[Q0].pop("dtype"), rf"tensor {Q0}: unknown dtype None"),
    "unknown dtype": (lambda h: h[Q0].update(dtype="F99"), rf"tensor {Q0}: unknown dtype 'F99'"),
    "integer dtype": (lambda h: h[Q0].update(dtype="I8"), rf"tensor {Q0}: dtype I8: GGUF export reads F32, F16"),
    "shape a string": (lambda h: h[Q0].update(shape="64x64"), rf"tensor {Q0}: shape '64x64' is not one or two"),
    "zero dimension": (lambda h: h[Q0].update(shape=[0, 64], data_offsets=[0, 0]), rf"tensor {Q0}: shape \[0, 64\]"),
    "offsets floats": (lambda h: h[Q0].update(data_offsets=[0.5, 3.5]), rf"tensor {Q0}: data_offsets \[0.5, 3.5\]"),
    "entry a list": (lambda h: h.update({Q0: [1, 2]}), rf"tensor {Q0}: its entry is a JSON list, not an object"),
    "header a list": (lambda h: None, r"is not a safetensors file: its header is a JSON list, not an object"),
    "shape against config": (_reshape, rf"tensor {Q0}: shape \[32, 128\] has no dimension of hidden_size 64; the "
                                       rf"checkpoint does not match its config.json"),
    "layer beyond config": (_rename, r"tensor model.layers.9.self_attn.q_proj.weight: it belongs to layer 9, but "
                                     r"config.json has 2 layers"),
}


def test_each_hostile_header_fails_naming_file_and_tensor_and_writes_nothing(tiny_dir, tmp_path):
    for name, (edit, message) in HOSTILE.items():
        model = edited(tiny_dir, tmp_path / "models", name.replace(" ", "_"), edit)
        weights = model / "model.safetensors"
        if name == "header a list":
            weights.write_bytes(join([1, 2], b""))
        out = tmp_path / "out" / name.replace(" ", "_")
        out.mkdir(parents=True)
        with pytest.raises(ValueError, match=message) as err:
            convert(model, out / "m.gguf")
        assert str(err.value).startswith(f"{weights}"), (name, err.value)
        assert list(out.iterdir()) == [], name


def test_short_files_and_impossible_header_lengths_are_refused(tiny_dir, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(tiny_dir, model)
    weights = model / "model.safetensors"
    cases = {b"\x01\x02": "its header length is missing", struct.pack("<Q", 2 ** 63) + b"{}":
             f"its header length {2 ** 63} does not fit the file (10 bytes)",
             struct.pack("<Q", 3) + b"{x}": "its header is not JSON"}
    for content, message in cases.items():
        weights.write_bytes(content)
        with pytest.raises(ValueError, match=re.escape(f"{weights} is not a safetensors file: {message}")):
            convert(model, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


# ----------------------------------------------------------------------------- property test

_DTYPE = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
JUNK = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(allow_nan=True),
                 st.text(max_size=6), st.lists(st.integers(-2 ** 40, 2 ** 40), max_size=3),
                 st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@st.composite
def safetensors_files(draw) -> bytes:
    """A valid file of a few small tensors, then up to three mutations of its header, length or bytes."""
    tensors, header, offset = [], {}, 0
    for i in range(draw(st.integers(1, 4))):
        dtype = draw(st.sampled_from(sorted(_DTYPE)))
        shape = draw(st.lists(st.integers(1, 5), min_size=1, max_size=2))
        size = int(np.prod(shape)) * np.dtype(_DTYPE[dtype]).itemsize
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        tensors.append(draw(st.binary(min_size=size, max_size=size)))
        offset += size
    if draw(st.booleans()):
        header["__metadata__"] = {"format": "pt"}
    data = b"".join(tensors)
    raw_override = None
    for _ in range(draw(st.integers(0, 3))):
        names = [k for k in header if k != "__metadata__"]
        how = draw(st.sampled_from(["field", "delete", "offset", "swap", "length", "truncate", "flip", "extend"]))
        key = draw(st.sampled_from(names)) if names else None
        if how == "field" and key:
            header[key][draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(
                st.one_of(JUNK, st.sampled_from(["F32", "F16", "BF16", "I8", "F64"])))
        elif how == "delete" and key:
            header[key].pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
        elif how == "offset" and key and isinstance(header[key].get("data_offsets"), list):
            header[key]["data_offsets"] = [o + draw(st.integers(-64, 64)) if isinstance(o, int) else o
                                           for o in header[key]["data_offsets"]]
        elif how == "swap" and len(names) > 1:
            a, b = draw(st.permutations(names))[:2]
            header[a]["data_offsets"], header[b]["data_offsets"] = (header[b].get("data_offsets"),
                                                                    header[a].get("data_offsets"))
        elif how == "length":
            raw_override = struct.pack("<Q", draw(st.integers(0, 2 ** 64 - 1)))
        elif how == "truncate":
            data = data[:draw(st.integers(0, len(data)))]
        elif how == "extend":
            data += draw(st.binary(max_size=32))
        elif how == "flip":
            raw_override = "flip"
    raw = join(header, data)
    if raw_override == "flip":
        i = draw(st.integers(0, min(len(raw), 200) - 1))
        raw = raw[:i] + bytes([raw[i] ^ draw(st.integers(1, 255))]) + raw[i + 1:]
    elif raw_override:
        raw = raw_override + raw[8:]
    return raw


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=safetensors_files())
def test_any_header_is_refused_clearly_or_read_exactly_as_it_says(raw):
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "model.safetensors"
        path.write_bytes(raw)
        tracemalloc.start()
        try:
            source = SafetensorsSource(Path(directory))
        except ValueError as err:
            assert str(err).startswith(str(path)), err
            return
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert peak <= len(raw) + (256 << 10), peak
        (n,) = struct.unpack("<Q", raw[:8])
        header, data_start = json.loads(raw[8:8 + n]), 8 + n
        spans = []
        for key, t in source.tensors.items():
            begin, end = header[key]["data_offsets"]
            assert t.offset == data_start + begin and data_start + end <= len(raw)
            spans.append((begin, end))
            expected = np.frombuffer(raw[data_start + begin:data_start + end], dtype=_DTYPE[t.dtype])
            expected = bf16_bits_to_f32(expected) if t.dtype == "BF16" else expected.astype(np.float32)
            rows, _ = source.rows_and_cols(t)
            got = source.read(t, 0, rows)
            assert np.array_equal(got.reshape(-1), expected.reshape(-1), equal_nan=True), key
        spans.sort()
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
