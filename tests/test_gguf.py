"""GGUF export, checked against the gguf package (llama.cpp's own Python reader, writer and quantizers).

Every file is read back with ``gguf.GGUFReader``; metadata values *and* types are compared; tensors are
dequantized with ``gguf.quants`` and compared with the HF weights after undoing llama.cpp's layout
changes (Q/K row interleave, Gemma's +1, GPT-2's transpose).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, quants
from safetensors.torch import load_file

from minift.export.gguf import writer as g
from minift.export.gguf.convert import convert

ARCH_CONFIGS = {  # HF model_type -> (config class name, extra kwargs); all hidden 64, 2 layers
    "mistral": ("MistralConfig", {"head_dim": 16}),
    "qwen2": ("Qwen2Config", {}),
    "gemma": ("GemmaConfig", {"head_dim": 16}),
    "phi3": ("Phi3Config", {"original_max_position_embeddings": 512}),
}
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gemma": "gemma", "phi3": "phi3", "gpt2": "gpt2"}
V = GGUFValueType


def build_model(out, tiny_dir, model_type: str, dtype=torch.float32, **overrides):
    """A random 2-layer, hidden-64 model of ``model_type`` with every weight random (norms and biases too)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    name, extra = ARCH_CONFIGS.get(model_type, ("LlamaConfig", {}))
    kwargs = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    config = getattr(transformers, name)(**{**kwargs, **extra, **overrides})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    model.to(dtype).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def models(tiny_dir, gpt2_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-models")
    dirs = {"llama": tiny_dir, "gpt2": gpt2_dir}
    for model_type in ARCH_CONFIGS:
        dirs[model_type] = build_model(root / model_type, tiny_dir, model_type)
    # bf16 weights, an MLP width (80) that does not fill 32-value blocks, and 6 embedding rows past the tokenizer
    dirs["bf16"] = build_model(root / "bf16", tiny_dir, "llama", torch.bfloat16, intermediate_size=80, vocab_size=880)
    return dirs


def fields(reader: GGUFReader) -> dict:
    """key -> (types, value) for every metadata key (the reader's own GGUF.* header fields left out)."""
    return {k: (f.types, f.contents()) for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def tensors(reader: GGUFReader) -> dict[str, tuple[GGMLQuantizationType, np.ndarray]]:
    """name -> (type, float32 values in PyTorch shape), dequantized by gguf's own code."""
    out = {}
    for t in reader.tensors:
        shape = tuple(reversed([int(d) for d in t.shape]))
        out[t.name] = (t.tensor_type, np.asarray(quants.dequantize(t.data, t.tensor_type), np.float32).reshape(shape))
    return out


def hf_weights(model_dir) -> dict[str, np.ndarray]:
    return {k: v.float().numpy() for f in sorted(model_dir.glob("*.safetensors")) for k, v in load_file(f).items()}


def uninterleave(x: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order: row 2i + j back to row j * head_dim / 2 + i."""
    return x.reshape(n_heads, x.shape[0] // n_heads // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def hf_name(name: str, model_type: str) -> str:
    """GGUF tensor name -> HF key (the inverse map, written out independently of minift's)."""
    if model_type == "gpt2":
        table = {"token_embd": "wte", "position_embd": "wpe", "output_norm": "ln_f", "attn_norm": "ln_1",
                 "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj", "ffn_norm": "ln_2", "ffn_up": "mlp.c_fc",
                 "ffn_down": "mlp.c_proj"}
        prefix, layer = "transformer.", "h"
    else:
        table = {"token_embd": "embed_tokens", "output_norm": "norm", "attn_norm": "input_layernorm",
                 "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                 "attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj",
                 "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj",
                 "ffn_up": "mlp.gate_up_proj" if model_type == "phi3" else "mlp.up_proj", "ffn_down": "mlp.down_proj"}
        prefix, layer = "model.", "layers"
    parts = name.split(".")
    if parts[0] == "output":
        return "lm_head." + parts[1]
    if parts[0] == "blk":
        return f"{prefix}{layer}.{parts[1]}.{table[parts[2]]}.{parts[3]}"
    return f"{prefix}{table[parts[0]]}.{parts[1]}"


def undo_layout(name: str, x: np.ndarray, model_type: str) -> np.ndarray:
    if GGUF_ARCH[model_type] == "llama" and ".attn_q." in name:
        return uninterleave(x, 4)
    if GGUF_ARCH[model_type] == "llama" and ".attn_k." in name:
        return uninterleave(x, 2)
    if model_type == "gemma" and name.endswith("norm.weight"):
        return x - np.float32(1)
    if model_type == "gpt2" and x.ndim == 2 and name.split(".")[-2] in ("attn_qkv", "attn_output", "ffn_up", "ffn_down"):
        return x.T
    return x


def assert_same_weight(name: str, x: np.ndarray, hf: np.ndarray, model_type: str) -> None:
    """GGUF tensor ``x`` equals HF weight ``hf`` once llama.cpp's layout is undone."""
    if model_type == "gemma" and name.endswith("norm.weight"):
        assert np.array_equal(x, hf + np.float32(1)), name
        # undoing the +1 loses at most the rounding of the addition (half an ulp of 1.0)
        np.testing.assert_allclose(undo_layout(name, x, model_type), hf, rtol=0, atol=2**-24, err_msg=name)
    else:
        assert np.array_equal(undo_layout(name, x, model_type), hf), name


# ----------------------------------------------------------------------------- the format and the quantizers


def edge_case_rows() -> np.ndarray:
    """Rows of 32-value blocks that hit every rounding edge of Q8_0 / Q4_0, then random rows."""
    rows = np.zeros((8, 64), np.float32)
    rows[1, :32] = np.arange(32) - 15.5  # exact halves
    rows[1, 0] = 127  # d = 1 for Q8_0: x * (1/d) lands exactly on the halves (round away from zero)
    rows[2, :32] = -8  # Q4_0: every value is the (negative) maximum
    rows[2, :16] = np.arange(16) * 0.5 - 4  # d = 1: x + 8.5 lands on halves
    rows[3, :32] = np.linspace(-3, 3, 32)
    rows[3, 7], rows[3, 20] = 5, -5  # equal magnitudes, opposite signs: the first sets Q4_0's sign
    rows[4, :32] = np.float32(0.49999997)  # just below a half: trunc(x + 0.5) would be wrong
    rows[4, 32:] = 1e-30  # tiny block scale (f16 underflow)
    rows[5] = np.random.default_rng(1).standard_normal(64) * 1e4
    rows[6, 32:] = -np.arange(32) / 31
    return np.concatenate([rows, np.random.default_rng(0).standard_normal((56, 64)).astype(np.float32)])


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # f16 of 3.4e38 is inf, on both sides
@pytest.mark.parametrize("ttype", ["Q8_0", "Q4_0", "BF16", "F16"])
def test_quantizers_bytes_equal_ggufs_reference(ttype):
    x = edge_case_rows()
    if ttype in ("BF16", "F16"):
        x = np.concatenate([x, np.array([[np.nan, -np.nan, np.inf, -np.inf, 3.4e38, -3.4e38, 1e-40, 65520] * 8],
                                        np.float32)])
    ours = np.ascontiguousarray(g.encode_rows(x, g.TensorType[ttype])).view(np.uint8)
    ref = np.ascontiguousarray(quants.quantize(x, GGMLQuantizationType[ttype])).view(np.uint8)
    assert ours.shape == ref.shape and np.array_equal(ours, ref)


def test_writer_is_byte_identical_to_ggufs_writer(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    arrays = {  # name -> (type, bytes as numpy, PyTorch shape); odd sizes exercise the padding
        "a.weight": (g.TensorType.F32, rng.standard_normal((3, 5)).astype(np.float32), (3, 5)),
        "b.weight": (g.TensorType.F16, rng.standard_normal(7).astype(np.float16), (7,)),
        "c.weight": (g.TensorType.BF16, g.f32_to_bf16_bits(x).view(np.uint8), (4, 64)),
        "d.weight": (g.TensorType.Q8_0, g.quantize_q8_0(x), (4, 64)),
        "e.weight": (g.TensorType.Q4_0, g.quantize_q4_0(x), (4, 64)),
    }
    metadata = {
        "general.architecture": g.string("llama"),
        "u8": (g.ValueType.UINT8, 250), "i8": (g.ValueType.INT8, -5), "u16": (g.ValueType.UINT16, 65000),
        "i16": (g.ValueType.INT16, -300), "u32": g.u32(2**32 - 1), "i32": g.i32(-(2**31)), "f32": g.f32(1e-6),
        "bool": g.boolean(True), "str": g.string("héllo ✓"), "u64": (g.ValueType.UINT64, 2**64 - 1),
        "i64": (g.ValueType.INT64, -(2**63)), "f64": (g.ValueType.FLOAT64, 0.1),
        "tokens": g.array(g.ValueType.STRING, ["a", "", "Ġb", "✓"]), "types": g.array(g.ValueType.INT32, [1, 3, -2]),
        "scores": g.array(g.ValueType.FLOAT32, [0.5, -1.25]), "ids": g.array(g.ValueType.UINT32, [7, 2**32 - 1]),
    }
    ours = g.write_gguf(tmp_path / "ours.gguf", metadata, [
        g.Tensor(name, shape, ttype, lambda data=data: [data]) for name, (ttype, data, shape) in arrays.items()])
    writer = GGUFWriter(tmp_path / "ref.gguf", "llama")
    for key, (vtype, value) in list(metadata.items())[1:]:
        if vtype == g.ValueType.ARRAY:
            writer.add_key_value(key, value[1], GGUFValueType.ARRAY, sub_type=GGUFValueType(value[0]))
        else:
            writer.add_key_value(key, value, GGUFValueType(vtype))
    for name, (ttype, data, _) in arrays.items():
        writer.add_tensor(name, data, raw_dtype=GGMLQuantizationType(ttype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert ours.read_bytes() == (tmp_path / "ref.gguf").read_bytes()


def test_writer_refuses_long_names_and_leaves_nothing_behind(tmp_path):
    def named(n: int) -> g.Tensor:
        return g.Tensor("blk.0." + "x" * (n - 13) + ".weight", (2,), g.TensorType.F32, lambda: [np.zeros(2, np.float32)])

    g.write_gguf(tmp_path / "ok" / "out.gguf", {}, [named(63)])
    shutil.rmtree(tmp_path / "ok")
    with pytest.raises(ValueError, match="is 64 bytes; GGUF .* allows at most 63"):
        g.write_gguf(tmp_path / "out.gguf", {}, [named(64)])

    def failing():
        yield np.zeros(1, np.float32)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        g.write_gguf(tmp_path / "out.gguf", {}, [g.Tensor("a", (2,), g.TensorType.F32, failing)])
    with pytest.raises(ValueError, match="'u32': -1 is not a UINT32"):
        g.write_gguf(tmp_path / "out.gguf", {"u32": g.u32(-1)}, [])
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- architectures


def test_llama_metadata_and_exact_f32_tensors(tiny_dir, tmp_path):
    from transformers import AutoTokenizer

    reader = GGUFReader(convert(tiny_dir, tmp_path / "tiny.gguf", outtype="f32"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    merges = [" ".join(m) for m in json.loads((tiny_dir / "tokenizer.json").read_text())["model"]["merges"]]
    expected = {
        "general.architecture": ([V.STRING], "llama"), "general.type": ([V.STRING], "model"),
        "general.name": ([V.STRING], tiny_dir.name), "general.file_type": ([V.UINT32], 0),
        "general.quantization_version": ([V.UINT32], 2), "general.alignment": ([V.UINT32], 32),
        "llama.context_length": ([V.UINT32], 1024), "llama.embedding_length": ([V.UINT32], 64),
        "llama.block_count": ([V.UINT32], 2), "llama.feed_forward_length": ([V.UINT32], 128),
        "llama.attention.head_count": ([V.UINT32], 4), "llama.attention.head_count_kv": ([V.UINT32], 2),
        "llama.attention.key_length": ([V.UINT32], 16), "llama.attention.value_length": ([V.UINT32], 16),
        "llama.attention.layer_norm_rms_epsilon": ([V.FLOAT32], np.float32(1e-6)),
        "llama.rope.dimension_count": ([V.UINT32], 16), "llama.rope.freq_base": ([V.FLOAT32], 10000.0),
        "llama.vocab_size": ([V.UINT32], 874),
        "tokenizer.ggml.model": ([V.STRING], "gpt2"), "tokenizer.ggml.pre": ([V.STRING], "gpt-2"),
        "tokenizer.ggml.tokens": ([V.ARRAY, V.STRING], tokenizer.convert_ids_to_tokens(list(range(874)))),
        "tokenizer.ggml.token_type": ([V.ARRAY, V.INT32], [3, 3, 3] + [1] * 871),
        "tokenizer.ggml.merges": ([V.ARRAY, V.STRING], merges),
        "tokenizer.ggml.bos_token_id": ([V.UINT32], 2),  # no BOS token: the EOS id, never llama.cpp's default 11
        "tokenizer.ggml.eos_token_id": ([V.UINT32], tokenizer.eos_token_id),
        "tokenizer.ggml.padding_token_id": ([V.UINT32], tokenizer.pad_token_id),
        "tokenizer.ggml.add_bos_token": ([V.BOOL], False), "tokenizer.ggml.add_eos_token": ([V.BOOL], False),
        "tokenizer.chat_template": ([V.STRING], tokenizer.chat_template),
    }
    got = fields(reader)
    assert sorted(got) == sorted(expected)
    for key, (types, value) in expected.items():
        assert got[key][0] == types, key
        assert got[key][1] == value, key
    weights, hf = tensors(reader), hf_weights(tiny_dir)
    assert len(weights) == len(hf) == 21
    for name, (ttype, x) in weights.items():
        assert ttype == GGMLQuantizationType.F32
        assert np.array_equal(undo_layout(name, x, "llama"), hf[hf_name(name, "llama")]), name
    # the interleave really moved rows: without undoing it the Q weight differs
    assert not np.array_equal(weights["blk.0.attn_q.weight"][1], hf["model.layers.0.self_attn.q_proj.weight"])


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "gemma", "phi3", "gpt2"])
def test_architectures_round_trip_exactly(models, model_type, tmp_path):
    model_dir = models[model_type]
    reader = GGUFReader(convert(model_dir, tmp_path / "m.gguf", outtype="f32"))
    meta, weights, hf = fields(reader), tensors(reader), hf_weights(model_dir)
    arch = GGUF_ARCH[model_type]
    u32, f32 = (lambda v: ([V.UINT32], v)), (lambda v: ([V.FLOAT32], np.float32(v)))
    if model_type == "gpt2":
        expected = {"context_length": u32(256), "embedding_length": u32(64), "feed_forward_length": u32(256),
                    "block_count": u32(2), "attention.head_count": u32(4), "attention.layer_norm_epsilon": f32(1e-5),
                    "vocab_size": u32(874)}
    else:
        expected = {"context_length": u32(512), "embedding_length": u32(64), "block_count": u32(2),
                    "feed_forward_length": u32(128), "attention.head_count": u32(4), "attention.head_count_kv": u32(2),
                    "attention.key_length": u32(16), "attention.value_length": u32(16),
                    "attention.layer_norm_rms_epsilon": f32(1e-5 if model_type == "phi3" else 1e-6),
                    "rope.dimension_count": u32(16), "rope.freq_base": f32(10000.0), "vocab_size": u32(874)}
    if model_type == "phi3":
        expected["rope.scaling.original_context_length"] = u32(512)
    assert meta["general.architecture"] == ([V.STRING], arch)
    assert {k: v for k, v in meta.items() if k.startswith(arch + ".")} == {f"{arch}.{k}": v for k, v in expected.items()}
    tied = model_type in ("gemma", "gpt2")
    assert ("output.weight" in weights) == (not tied) and not any("lm_head" in k for k in weights)
    expected_keys = {k for k in hf if not (tied and k == "lm_head.weight")}
    assert {hf_name(n, model_type) for n in weights} == expected_keys
    for name, (_, x) in weights.items():
        assert_same_weight(name, x, hf[hf_name(name, model_type)], model_type)
    if model_type == "qwen2":
        assert "blk.0.attn_q.bias" in weights
    if model_type == "phi3":
        assert weights["blk.0.ffn_up.weight"][1].shape == (256, 64)
    if model_type == "gpt2":
        assert weights["position_embd.weight"][0] == GGMLQuantizationType.F32


def test_bf16_source_types_and_padding(models, tmp_path):
    model_dir = models["bf16"]
    hf = hf_weights(model_dir)
    files = {o: convert(model_dir, tmp_path / f"{o}.gguf", outtype=o) for o in ("bf16", "f16", "q8_0", "q4_0")}
    lossless = tensors(GGUFReader(files["bf16"]))  # the interleaved bf16 weights (checked exact below)
    for outtype, file_type in (("bf16", 32), ("f16", 1), ("q8_0", 7), ("q4_0", 2)):
        reader = GGUFReader(files[outtype])
        assert fields(reader)["general.file_type"] == ([V.UINT32], file_type)
        for name, (ttype, x) in tensors(reader).items():
            expect = outtype.upper()
            if x.ndim == 1:
                expect = "F32"  # norms stay F32
            elif x.shape[-1] % 32 and outtype.startswith("q"):
                expect = "F16"  # ffn_down rows of 80 values do not fill 32-value blocks
            assert ttype.name == expect, (outtype, name)
            source = hf[hf_name(name, "llama")]
            if expect in ("BF16", "F32"):  # bf16 -> BF16 is lossless
                assert np.array_equal(undo_layout(name, x, "llama"), source), name
            elif expect == "F16":
                assert np.array_equal(undo_layout(name, x, "llama"), source.astype(np.float16).astype(np.float32))
            else:  # the same bytes as gguf's quantizer on the same (interleaved) weights
                ref = quants.quantize(lossless[name][1], GGMLQuantizationType[expect])
                data = next(t.data for t in reader.tensors if t.name == name)
                assert np.array_equal(np.asarray(data).reshape(ref.shape), ref), name
    meta = fields(GGUFReader(files["bf16"]))
    assert meta["tokenizer.ggml.tokens"][1][874:] == [f"[PAD{i}]" for i in range(874, 880)]
    assert meta["tokenizer.ggml.token_type"][1][873:] == [1] + [5] * 6


def copy_model(src, dst, config_changes: dict | None = None, drop: tuple = ()):
    """A copy of a model directory (weights linked), with config.json edited and some files left out."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name not in drop:
            (dst / f.name).symlink_to(f.resolve()) if f.suffix == ".safetensors" else shutil.copy(f, dst / f.name)
    if config_changes:
        config = json.loads((dst / "config.json").read_text())
        config.update(config_changes)
        (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "beta_fast": 32.0, "beta_slow": 1.0},
])
def test_rope_scaling(tiny_dir, tmp_path, rope):
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    model_dir = copy_model(tiny_dir, tmp_path / "m", {"rope_parameters": {"rope_theta": 500000.0, **rope}})
    reader = GGUFReader(convert(model_dir, tmp_path / "m.gguf", outtype="f32"))
    meta, weights = fields(reader), tensors(reader)
    assert meta["llama.rope.freq_base"] == ([V.FLOAT32], 500000.0)
    if rope["rope_type"] == "llama3":  # llama.cpp divides each frequency by its factor, as transformers does
        config = AutoConfig.from_pretrained(model_dir)
        scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
        base = 1.0 / (500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
        ttype, factors = weights["rope_freqs.weight"]
        assert ttype == GGMLQuantizationType.F32 and factors.shape == (8,) and factors.max() == 8.0
        np.testing.assert_allclose(base.numpy() / factors, scaled.numpy(), rtol=1e-6)
        assert "llama.rope.scaling.type" not in meta
    else:
        assert meta["llama.rope.scaling.type"] == ([V.STRING], rope["rope_type"])
        assert meta["llama.rope.scaling.factor"] == ([V.FLOAT32], rope["factor"])
        assert "rope_freqs.weight" not in weights
    if rope["rope_type"] == "yarn":
        assert meta["llama.rope.scaling.original_context_length"] == ([V.UINT32], 256)
        assert meta["llama.rope.scaling.yarn_beta_fast"] == ([V.FLOAT32], 32.0)
        assert meta["llama.rope.scaling.yarn_beta_slow"] == ([V.FLOAT32], 1.0)


# ----------------------------------------------------------------------------- tokenizers

LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


def edit_tokenizer(model_dir, change) -> None:
    path = model_dir / "tokenizer.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def split_then_bytes(regex: str):
    def change(data):
        data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    return change


@pytest.mark.parametrize("regex,name", [(LLAMA3_REGEX, "llama-bpe"), (LLAMA3_REGEX.replace("{1,3}", ""), "qwen2"),
                                        (r"\p{N}|[^\p{N}]+", None)])
def test_pre_tokenizer_name_comes_from_the_configuration(tiny_dir, tmp_path, regex, name):
    from minift.export.gguf.tokenizer import tokenizer_metadata

    model_dir = copy_model(tiny_dir, tmp_path / "m")
    edit_tokenizer(model_dir, split_then_bytes(regex))
    config = json.loads((model_dir / "config.json").read_text())
    if name is None:
        with pytest.raises(ValueError, match=r"tokenizer.json: the pre-tokenizer \(Split \+ ByteLevel\) is not one "
                                             r"llama.cpp implements.*Recognized: .*gpt-2.*llama-bpe.*qwen2"):
            tokenizer_metadata(model_dir, 874, config)
    else:
        assert tokenizer_metadata(model_dir, 874, config)["tokenizer.ggml.pre"] == g.string(name)


def proto(*fields: tuple[int, object]) -> bytes:
    """Protobuf encoding of (field, value) pairs: ints as varints, floats as fixed32, bytes/str length-delimited."""
    def varint(n):
        out = b""
        while True:
            out, n = out + bytes([n & 0x7F | (0x80 if n > 0x7F else 0)]), n >> 7
            if not n:
                return out
    out = b""
    for field, value in fields:
        if isinstance(value, float):
            out += varint(field << 3 | 5) + np.float32(value).tobytes()
        elif isinstance(value, int):
            out += varint(field << 3) + varint(value)
        else:
            raw = value.encode() if isinstance(value, str) else value
            out += varint(field << 3 | 2) + varint(len(raw)) + raw
    return out


def test_sentencepiece_model(tiny_dir, tmp_path):
    from minift.export.gguf.tokenizer import tokenizer_metadata

    pieces = [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3), ("<0x0A>", 0.0, 6), ("▁the", -1.5, None),
              ("▁", -2.25, None), ("t", -3.0, None)]

    def sp_model(model_type: int) -> bytes:  # ModelProto: pieces, TrainerSpec.model_type, NormalizerSpec.add_dummy_prefix
        return proto(*[(1, proto(*[(1, p), (2, s)] + ([(3, t)] if t else []))) for p, s, t in pieces],
                     (2, proto((3, model_type))), (3, proto((3, 1))))

    model_dir = copy_model(tiny_dir, tmp_path / "sp", drop=("tokenizer.json", "chat_template.jinja"))
    (model_dir / "tokenizer.model").write_bytes(sp_model(2))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                                  "unk_token": "<unk>"}))
    meta = tokenizer_metadata(model_dir, 9, {})
    assert meta["tokenizer.ggml.model"] == g.string("llama") and meta["tokenizer.ggml.pre"] == g.string("default")
    assert meta["tokenizer.ggml.tokens"][1][1] == [p for p, _, _ in pieces] + ["[PAD7]", "[PAD8]"]
    assert meta["tokenizer.ggml.scores"][1] == (g.ValueType.FLOAT32, [s for _, s, _ in pieces] + [-10000.0] * 2)
    assert meta["tokenizer.ggml.token_type"][1][1] == [2, 3, 3, 6, 1, 1, 1, 5, 5]
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (g.u32(1), g.u32(2))
    assert meta["tokenizer.ggml.unknown_token_id"] == g.u32(0)
    assert meta["tokenizer.ggml.add_bos_token"] == g.boolean(True)  # SentencePiece Llama convention
    assert meta["tokenizer.ggml.add_space_prefix"] == g.boolean(True)
    (model_dir / "tokenizer.model").write_bytes(sp_model(1))  # a unigram model
    with pytest.raises(ValueError, match="unigram SentencePiece model; llama.cpp's 'llama' tokenizer implements "
                                         "SentencePiece BPE only"):
        tokenizer_metadata(model_dir, 9, {})


def test_sentencepiece_bpe_in_tokenizer_json(tiny_dir, tmp_path):
    from minift.export.gguf.tokenizer import tokenizer_metadata

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<0x41>": 3, "▁": 4, "a": 5, "b": 6, "▁a": 7, "ab": 8, "▁ab": 9}
    model_dir = copy_model(tiny_dir, tmp_path / "spj", drop=("tokenizer.json",))
    (model_dir / "tokenizer.json").write_text(json.dumps({
        "added_tokens": [{"id": 1, "content": "<s>", "special": True}, {"id": 2, "content": "</s>", "special": True}],
        "normalizer": None, "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first"},
        "post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                                                   {"Sequence": {"id": "A", "type_id": 0}}]},
        "model": {"type": "BPE", "byte_fallback": True, "unk_token": "<unk>", "vocab": vocab,
                  "merges": [["▁", "a"], ["a", "b"], ["▁a", "b"]]}}))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    meta = tokenizer_metadata(model_dir, 10, {})
    assert meta["tokenizer.ggml.model"] == g.string("llama")
    assert meta["tokenizer.ggml.tokens"][1][1] == list(vocab)
    # the token made by merge k scores -k, so llama.cpp's highest-score-first merging follows the merge order
    assert meta["tokenizer.ggml.scores"][1][1] == [0.0] * 7 + [0.0, -1.0, -2.0]
    assert meta["tokenizer.ggml.token_type"][1][1] == [2, 3, 3, 6, 1, 1, 1, 1, 1, 1]
    assert meta["tokenizer.ggml.add_bos_token"] == g.boolean(True)  # the post-processor prepends <s>
    assert meta["tokenizer.ggml.bos_token_id"] == g.u32(1) and meta["tokenizer.ggml.add_space_prefix"] == g.boolean(True)


# ----------------------------------------------------------------------------- adapters


def make_adapter(base_dir, out, seed: int, **lora):
    """Save a minift adapter with non-zero B (and, for DoRA, magnitudes away from their initial norms)."""
    from minift.lora.adapters import save_adapter
    from minift.lora.config import LoraConfig
    from minift.lora.layers import apply_lora
    from minift.model.load import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(str(base_dir), dtype="float32")
    torch.manual_seed(seed)
    apply_lora(model, LoraConfig(init_lora_weights=False, **lora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + torch.rand_like(p))
    return save_adapter(model, out, base_model_name_or_path=str(base_dir))


def peft_adapter(base_dir, out):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(out)
    return out


def test_merged_adapters_equal_merge_and_save(tiny_dir, gpt2_dir, tmp_path):
    from minift.lora.merge import merge_and_save

    chains = {
        "llama": (tiny_dir, [
            make_adapter(tiny_dir, tmp_path / "a1", 1, r=8, lora_alpha=16),
            make_adapter(tiny_dir, tmp_path / "a2", 2, r=4, lora_alpha=8, use_rslora=True, rank_pattern={"q_proj": 2},
                         alpha_pattern={"o_proj": 3.0}, target_modules=["q_proj", "k_proj", "o_proj", "down_proj"]),
            make_adapter(tiny_dir, tmp_path / "a3", 3, r=4, lora_alpha=8, use_dora=True,
                         target_modules=["k_proj", "v_proj"]),
            peft_adapter(tiny_dir, tmp_path / "peft")]),
        "gpt2": (gpt2_dir, [make_adapter(gpt2_dir, tmp_path / "g1", 4, r=4, lora_alpha=8,
                                         target_modules=["c_attn", "c_fc"])]),
    }
    for model_type, (base, adapters) in chains.items():
        merged = merge_and_save(str(base), adapters, tmp_path / f"{model_type}-merged")
        ours = tensors(GGUFReader(convert(base, tmp_path / f"{model_type}.gguf", outtype="f32", adapters=adapters)))
        ref = tensors(GGUFReader(convert(merged, tmp_path / f"{model_type}-ref.gguf", outtype="f32")))
        plain = tensors(GGUFReader(convert(base, tmp_path / f"{model_type}-base.gguf", outtype="f32")))
        assert ours.keys() == ref.keys()
        for name in ours:
            assert np.array_equal(ours[name][1], ref[name][1]), (model_type, name)
        changed = "blk.0.attn_qkv.weight" if model_type == "gpt2" else "blk.1.attn_v.weight"
        assert not np.array_equal(ours[changed][1], plain[changed][1])


def lora_state(adapter_dir) -> dict[str, np.ndarray]:
    state = load_file(adapter_dir / "adapter_model.safetensors")
    return {k.removeprefix("base_model.model.model.layers."): v.numpy() for k, v in state.items()}


def test_lora_only_gguf_folds_every_scale_into_lora_b(tiny_dir, tmp_path):
    plain = make_adapter(tiny_dir, tmp_path / "plain", 1, r=8, lora_alpha=16, target_modules=["q_proj", "k_proj"])
    tuned = make_adapter(tiny_dir, tmp_path / "tuned", 2, r=8, lora_alpha=16, use_rslora=True,
                         rank_pattern={"k_proj": 4}, alpha_pattern={"v_proj": 4.0},
                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    projections = {"q_proj": ("attn_q", 4), "k_proj": ("attn_k", 2), "v_proj": ("attn_v", 0), "o_proj": ("attn_output", 0)}
    for adapter, rslora in ((plain, False), (tuned, True)):
        reader = GGUFReader(convert(tiny_dir, tmp_path / f"{adapter.name}.gguf", outtype="f32", adapters=[adapter],
                                    lora_only=True))
        meta, weights, state = fields(reader), tensors(reader), lora_state(adapter)
        assert meta["general.architecture"] == ([V.STRING], "llama") and meta["general.type"] == ([V.STRING], "adapter")
        assert meta["adapter.type"] == ([V.STRING], "lora") and meta["adapter.lora.alpha"] == ([V.FLOAT32], 16.0)
        assert len(weights) == len(state)  # a lora_a and a lora_b per module
        for key in state:
            if not key.endswith("lora_A.weight"):
                continue
            layer, _, proj = key.split(".")[:3]
            name, heads = projections[proj]
            a, b = state[key], state[key.replace("lora_A", "lora_B")]
            lora_a, lora_b = weights[f"blk.{layer}.{name}.weight.lora_a"][1], weights[f"blk.{layer}.{name}.weight.lora_b"][1]
            lora_b = uninterleave(lora_b, heads) if heads else lora_b
            assert np.array_equal(lora_a, a)
            r, alpha = a.shape[0], 4.0 if proj == "v_proj" else 16.0
            if not rslora:  # alpha / r is already exact: lora_b is B, bit for bit
                assert np.array_equal(lora_b, b)
            # llama.cpp's delta (adapter alpha / tensor rank) * lora_b @ lora_a equals the adapter's own
            scale = alpha / np.sqrt(r) if rslora else alpha / r
            np.testing.assert_allclose((16.0 / r) * lora_b, scale * b, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", ["dora", "modules_to_save"])
def test_lora_only_refuses_what_llama_cpp_cannot_express(tiny_dir, tmp_path, kind):
    lora = {"use_dora": True} if kind == "dora" else {"modules_to_save": ["lm_head"]}
    adapter = make_adapter(tiny_dir, tmp_path / kind, 1, r=4, target_modules=["q_proj"], **lora)
    (tmp_path / "out").mkdir()
    message = "a DoRA adapter" if kind == "dora" else r"an adapter with modules_to_save \(lm_head\)"
    with pytest.raises(ValueError, match=f"{message}, which llama.cpp's LoRA format cannot express; merge it"):
        convert(tiny_dir, tmp_path / "out" / "a.gguf", adapters=[adapter], lora_only=True)
    assert list((tmp_path / "out").iterdir()) == []


# ----------------------------------------------------------------------------- bad input and the CLI


def broken_inputs(tiny_dir, gpt2_dir, root):
    """name -> (model dir, convert kwargs, error type, message regex)."""
    other = build_model(root / "other", tiny_dir, "llama", hidden_size=32, intermediate_size=64)
    anonymous = make_adapter(other, root / "anonymous", 5, r=4, target_modules=["q_proj"])
    config = json.loads((anonymous / "adapter_config.json").read_text())
    del config["minift"]  # as peft writes it: no fingerprint, so only the shapes can tell
    (anonymous / "adapter_config.json").write_text(json.dumps(config))
    duplicate = copy_model(tiny_dir, root / "duplicate")
    edit_tokenizer(duplicate, lambda d: d["added_tokens"][1].update(content="!"))
    return {
        "arch": (copy_model(tiny_dir, root / "falcon", {"model_type": "falcon"}), {}, ValueError,
                 "architecture 'falcon' is not supported for GGUF export; supported: llama, mistral, qwen2, gemma, "
                 "phi3, gpt2"),
        "rope": (copy_model(tiny_dir, root / "longrope", {"rope_parameters": {"rope_type": "longrope"}}), {},
                 ValueError, "rope type 'longrope' is not supported for llama GGUF export; supported: default, linear"),
        "tokenizer": (copy_model(tiny_dir, root / "notok", drop=("tokenizer.json", "tokenizer_config.json")), {},
                      FileNotFoundError, r"has no tokenizer \(tokenizer.json or tokenizer.model\)"),
        "duplicate": (duplicate, {}, ValueError, r"token '!' appears at ids \[1, 3\]; llama.cpp requires unique"),
        "fingerprint": (tiny_dir, {"adapters": [make_adapter(gpt2_dir, root / "g", 1, r=4, target_modules=["c_attn"])]},
                        ValueError, "was trained on a different base model"),
        "shapes": (tiny_dir, {"adapters": [anonymous]}, ValueError,
                   r"q_proj maps 32 -> 32 features but the base weight is \[64, 64\].*different base model"),
    }


def test_bad_input_fails_clearly_and_leaves_nothing(tiny_dir, gpt2_dir, tmp_path):
    for name, (model_dir, kwargs, error, message) in broken_inputs(tiny_dir, gpt2_dir, tmp_path).items():
        out = tmp_path / f"out-{name}"
        out.mkdir()
        for lora_only in (False, True) if "adapters" in kwargs else (False,):
            with pytest.raises(error, match=message):
                convert(model_dir, out / "m.gguf", lora_only=lora_only, **kwargs)
        assert list(out.iterdir()) == [], name


def test_cli(tiny_dir, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "tools" / "convert_to_gguf.py"
    ok = subprocess.run([sys.executable, str(script), str(tiny_dir), "-o", str(tmp_path / "m.gguf"), "--outtype",
                         "q8_0", "--ollama"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert GGUFReader(tmp_path / "m.gguf").fields["general.file_type"].contents() == 7
    assert (tmp_path / "Modelfile").read_text() == (
        'FROM ./m.gguf\nTEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
        '{{ end }}<|im_start|>assistant\n"""\nPARAMETER stop "<|im_end|>"\n')
    bad = subprocess.run([sys.executable, str(script), str(tmp_path / "missing"), "-o", str(tmp_path / "x.gguf")],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [f"error: model directory {tmp_path / 'missing'} does not exist"]


def test_sharded_checkpoint_and_small_chunks_give_the_same_file(tiny_dir, gpt2_dir, models, random_adapters, tmp_path,
                                                                monkeypatch):
    """Sharded weights, and chunks far smaller than a tensor (Q/K chunks cut at head boundaries, also when an adapter
    is merged, GPT-2's transposed weights split after the transpose), write exactly the bytes of the one-chunk
    conversion."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minift.export.gguf import convert as gguf_convert

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_dir).save_pretrained(sharded, max_shard_size="200KB")
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(sharded)
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 1
    cases = [(tiny_dir, sharded, "q8_0", []), (models["bf16"], models["bf16"], "bf16", []),
             (gpt2_dir, gpt2_dir, "q4_0", []), (tiny_dir, tiny_dir, "f32", [random_adapters / "a"])]
    for i, (base, other, outtype, adapters) in enumerate(cases):
        one = convert(base, tmp_path / f"one{i}" / "m.gguf", outtype=outtype, adapters=adapters)
        with monkeypatch.context() as patch:
            patch.setattr(gguf_convert, "CHUNK_VALUES", 100)  # 1-2 rows of 64 values; Q/K: one 16-row head
            patch.setattr(gguf_convert, "COPY_BYTES", 1000)
            many = convert(other, tmp_path / f"many{i}" / "m.gguf", outtype=outtype, adapters=adapters)
        a, b = GGUFReader(one), GGUFReader(many)
        assert {k: v for k, v in fields(a).items() if k != "general.name"} == \
            {k: v for k, v in fields(b).items() if k != "general.name"}
        assert [(t.name, t.tensor_type, t.data.tobytes()) for t in a.tensors] == \
            [(t.name, t.tensor_type, t.data.tobytes()) for t in b.tensors]
