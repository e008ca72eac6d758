"""A GGUF file as the model: minift's own GGUF of the tiny model goes through transformers' GGUF loader into a cached
safetensors directory, and comes back with the same logits, tokens and chat template; bad files are refused early."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, load_recipe
from minift.export.gguf.convert import convert
from minift.export.gguf.writer import Tensor, TensorType, string, write_gguf
from minift.model import from_gguf
from minift.model.files import cache_dir
from minift.model.load import load_model_and_tokenizer, resolve_model_path

TEXT = "<|im_start|>user\nReverse the words: cat dog<|im_end|>\n<|im_start|>assistant\n dog   cat 42 né"


@pytest.fixture(scope="module")
def tiny_gguf(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-gguf")
    return {t: convert(tiny_dir, out / f"tiny-{t}.gguf", outtype=t) for t in ("f32", "q8_0")}


def test_gguf_loads_as_the_model_it_was_written_from(tiny_dir, tiny_gguf, monkeypatch):
    base, tokenizer = load_model_and_tokenizer(str(tiny_dir))
    for outtype, tolerance in (("f32", 0.0), ("q8_0", 0.05)):  # q8_0: relative to the largest logit
        model, gguf_tokenizer = load_model_and_tokenizer(str(tiny_gguf[outtype]))
        ids = tokenizer(TEXT)["input_ids"]
        assert gguf_tokenizer(TEXT)["input_ids"] == ids
        assert gguf_tokenizer.chat_template == tokenizer.chat_template
        assert (gguf_tokenizer.eos_token, gguf_tokenizer.pad_token) == (tokenizer.eos_token, tokenizer.pad_token)
        with torch.no_grad():
            x = torch.tensor([ids])
            logits, expected = model(x).logits, base(x).logits
        diff = (logits - expected).abs().max().item()
        assert diff <= tolerance * expected.abs().max().item(), (outtype, diff)
        assert torch.equal(logits.argmax(-1), expected.argmax(-1))
        if outtype == "q8_0":
            assert diff > 0  # really the quantized weights, not a copy of the original
    cached = resolve_model_path(str(tiny_gguf["f32"]))
    assert Path(cached).parent == cache_dir() and Path(cached).name.startswith("gguf-")

    def no_second_conversion(*args):
        raise AssertionError("a cached GGUF was dequantized again")

    monkeypatch.setattr(from_gguf, "_dequantize", no_second_conversion)
    assert resolve_model_path(str(tiny_gguf["f32"])) == cached
    assert (Path(cached) / "model.safetensors").stat().st_mode & 0o777 == 0o644


def _gguf(path, metadata, tensor_type=TensorType.F32):
    data = np.zeros((2, 32), np.float32)
    write_gguf(path, {k: string(v) for k, v in metadata.items()},
               [Tensor("token_embd.weight", data.shape, tensor_type, lambda: iter([data.tobytes()]))])
    return path


def test_bad_gguf_files_are_refused_before_loading(tmp_path, tiny_gguf):
    cases = {
        "not a GGUF file": tmp_path / "text.gguf",
        "is a LoRA adapter GGUF, not a model": _gguf(tmp_path / "adapter.gguf", {"general.architecture": "llama",
                                                                                "general.type": "adapter"}),
        "architecture 'rwkv9' is not one transformers' GGUF loader reads": _gguf(
            tmp_path / "rwkv.gguf", {"general.architecture": "rwkv9"}),
    }
    cases["not a GGUF file"].write_text("hello")
    for message, path in cases.items():
        with pytest.raises(ValueError, match=message):
            resolve_model_path(str(path))
    whole = tiny_gguf["f32"].read_bytes()
    for name, data in (("header", whole[:5000]), ("data", whole[:-100])):  # cut inside the header / the tensors
        truncated = tmp_path / f"truncated-{name}.gguf"
        truncated.write_bytes(data)
        with pytest.raises(ValueError, match="truncated"):
            resolve_model_path(str(truncated))
    # A hostile header (2^62 metadata entries, then a key claiming 2^62 bytes) is refused at once, unallocated.
    hostile = tmp_path / "hostile.gguf"
    hostile.write_bytes(b"GGUF" + struct.pack("<IQQQ", 3, 1, 1 << 62, 1 << 62) + b"x" * 64)
    with pytest.raises(ValueError, match="truncated or its header is corrupt"):
        resolve_model_path(str(hostile))
    # A tensor type no dequantizer reads (Q8_1, id 9) is named.
    q8_1 = _gguf(tmp_path / "q8_1.gguf", {"general.architecture": "llama"})
    raw = bytearray(q8_1.read_bytes())
    type_at = raw.index(b"token_embd.weight") + len(b"token_embd.weight") + 4 + 2 * 8
    assert struct.unpack_from("<I", raw, type_at)[0] == TensorType.F32
    struct.pack_into("<I", raw, type_at, 9)
    q8_1.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="tensor type\\(s\\) Q8_1 cannot be dequantized"):
        resolve_model_path(str(q8_1))
    done = subprocess.run([sys.executable, str(ROOT / "recipes" / "sft.py"), "--model_name_or_path",
                           str(cases["not a GGUF file"]), "--output_dir", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"error: {cases['not a GGUF file']} is not a GGUF file (it does " \
                                                   f"not start with b'GGUF')"


@pytest.mark.slow
def test_fine_tune_a_gguf_and_write_it_back(tiny_gguf, tmp_path, in_process):
    """The round trip: SFT with the GGUF as the base, then the merged model and the adapter written back as GGUF."""
    from gguf import GGUFReader

    gguf = str(tiny_gguf["f32"])
    sft = load_recipe("sft")
    out = tmp_path / "sft"
    sft.main(sft.SFTConfig(model_name_or_path=gguf, output_dir=str(out), max_steps=3, logging_steps=1,
                           answer_eval_dataset=None))
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    for extra, kind in (([], "model"), (["--lora-only"], "adapter")):
        target = tmp_path / f"{kind}.gguf"
        done = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_to_gguf.py"), gguf, "-o", str(target),
                               "--outtype", "f32", "--adapter", str(out / "adapter"), *extra],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert GGUFReader(target).fields["general.type"].contents() == kind
    merged = tmp_path / "merged"
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "merge_adapter.py"), gguf, str(out / "adapter"),
                           "-o", str(merged)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    # The merged GGUF equals the merged directory converted: the same weights reached both.
    direct = convert(merged, tmp_path / "direct.gguf", outtype="f32")
    a, b = GGUFReader(direct), GGUFReader(tmp_path / "model.gguf")
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for x, y in zip(a.tensors, b.tensors):
        np.testing.assert_allclose(np.asarray(x.data), np.asarray(y.data), atol=1e-5, err_msg=x.name)


def test_header_reader_matches_gguf_and_its_types(tiny_gguf):
    """minift's own header reader lists the types (and block sizes) that the gguf package, which transformers'
    loader calls, dequantizes: checked against the package, and the tiny GGUF's header against gguf's reader."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
    from gguf.quants import _type_traits

    from minift.export.gguf.reader import READABLE_TYPES, missing_bytes, read_header

    for path in tiny_gguf.values():
        header, oracle = read_header(path), GGUFReader(path)
        assert header.metadata == {key: field.contents() for key, field in oracle.fields.items()
                                   if not key.startswith("GGUF.")}
        assert [(t.name, t.shape, t.type_id, t.offset + header.data_offset) for t in header.tensors] == \
               [(t.name, tuple(int(d) for d in t.shape), int(t.tensor_type), int(t.data_offset)) for t in oracle.tensors]
        assert missing_bytes(header) == 0
    for type_id, (name, per_block, block_bytes) in READABLE_TYPES.items():
        gguf_type = GGMLQuantizationType(type_id)
        assert gguf_type.name == name
        assert GGML_QUANT_SIZES[gguf_type] == (per_block, block_bytes)
        assert gguf_type in _type_traits or name in ("F32", "F16")
