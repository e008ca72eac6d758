"""What llama.cpp expects of each supported architecture: hyper-parameter metadata, HF -> GGUF tensor
names, and the weight transforms its kernels assume.

- ``llama`` (HF Llama and Mistral): llama.cpp rotates adjacent pairs (NORM rope) where HF rotates
  halves (NEOX), so Q and K rows (weights and biases) are interleaved per head: new row ``2i + j`` is
  old row ``j * head_dim / 2 + i`` (``i < head_dim / 2``, ``j`` in {0, 1}); K uses the KV head count.
- ``qwen2``, ``phi3`` (fused ``qkv_proj`` and ``gate_up_proj``, gate first): written as they are.
- ``gemma``: HF's RMSNorm computes ``x * (1 + w)``, llama.cpp ``x * w``: norm weights are written ``w + 1``.
- ``gpt2``: ``Conv1D`` stores ``[in, out]``; llama.cpp wants ``[out, in]``, so those weights are transposed.

``config`` is the model's ``config.json`` as a dict (read without transformers, which pulls in torch).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from minift.export.gguf.writer import Value, f32, string, u32

# HF model_type -> GGUF architecture
SUPPORTED = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gemma": "gemma", "phi3": "phi3",
             "gpt2": "gpt2"}

# Module path without the leading "model." / "transformer." ({n}: layer index) -> GGUF name.
_DECODER_NAMES = {
    "embed_tokens": "token_embd",
    "norm": "output_norm",
    "lm_head": "output",
    "layers.{n}.input_layernorm": "blk.{n}.attn_norm",
    "layers.{n}.self_attn.q_proj": "blk.{n}.attn_q",
    "layers.{n}.self_attn.k_proj": "blk.{n}.attn_k",
    "layers.{n}.self_attn.v_proj": "blk.{n}.attn_v",
    "layers.{n}.self_attn.qkv_proj": "blk.{n}.attn_qkv",
    "layers.{n}.self_attn.o_proj": "blk.{n}.attn_output",
    "layers.{n}.post_attention_layernorm": "blk.{n}.ffn_norm",
    "layers.{n}.mlp.gate_proj": "blk.{n}.ffn_gate",
    "layers.{n}.mlp.up_proj": "blk.{n}.ffn_up",
    "layers.{n}.mlp.gate_up_proj": "blk.{n}.ffn_up",  # llama.cpp's phi3 splits the fused tensor itself
    "layers.{n}.mlp.down_proj": "blk.{n}.ffn_down",
}
_GPT2_NAMES = {
    "wte": "token_embd",
    "wpe": "position_embd",
    "ln_f": "output_norm",
    "lm_head": "output",
    "h.{n}.ln_1": "blk.{n}.attn_norm",
    "h.{n}.attn.c_attn": "blk.{n}.attn_qkv",
    "h.{n}.attn.c_proj": "blk.{n}.attn_output",
    "h.{n}.ln_2": "blk.{n}.ffn_norm",
    "h.{n}.mlp.c_fc": "blk.{n}.ffn_up",
    "h.{n}.mlp.c_proj": "blk.{n}.ffn_down",
}
_GPT2_CONV1D = ("attn_qkv", "attn_output", "ffn_up", "ffn_down")
# Buffers some checkpoints carry that are recomputed at load time (llama.cpp has no such tensors).
_IGNORED = re.compile(r"(.*\.)?(rotary_emb\.inv_freq|attn\.bias|attn\.masked_bias)")
_ROPE_TYPES = {"llama": ("default", "linear", "yarn", "llama3"), "qwen2": ("default", "linear", "yarn"),
               "gemma": ("default", "linear"), "phi3": ("default",)}


@dataclass(frozen=True)
class ModelSpec:
    """The facts about a model that the conversion needs, read from its config.json."""

    model_type: str
    arch: str  # GGUF architecture name
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    tied: bool  # tied input/output embeddings: no output.weight is written
    config: dict


def _field(config: dict, where: str, *names: str, default=None):
    for name in names:
        if config.get(name) is not None:
            return config[name]
    if default is None:
        raise ValueError(f"{where}: config field {names[0]!r} is missing; it is needed to write the GGUF header")
    return default


def model_spec(config: dict, where: str = "config.json") -> ModelSpec:
    """Check the architecture is supported and read its shape; ``where`` names the file in errors."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED:
        raise ValueError(f"{where}: architecture {model_type!r} is not supported for GGUF export; supported: "
                         f"{', '.join(SUPPORTED)}")
    if model_type == "gpt2":
        n_heads = _field(config, where, "n_head")
        hidden = _field(config, where, "n_embd")
        return ModelSpec(model_type, "gpt2", _field(config, where, "n_layer"), n_heads, n_heads, hidden // n_heads,
                         bool(config.get("tie_word_embeddings", True)), config)
    n_heads = _field(config, where, "num_attention_heads")
    hidden = _field(config, where, "hidden_size")
    tied_default = model_type == "gemma"  # the transformers defaults of each config class
    return ModelSpec(model_type, SUPPORTED[model_type], _field(config, where, "num_hidden_layers"), n_heads,
                     _field(config, where, "num_key_value_heads", default=n_heads),
                     _field(config, where, "head_dim", default=hidden // n_heads),
                     bool(config.get("tie_word_embeddings", tied_default)), config)


def gguf_name(spec: ModelSpec, key: str) -> str | None:
    """The GGUF name of HF tensor ``key`` (e.g. ``model.layers.0.self_attn.q_proj.weight`` ->
    ``blk.0.attn_q.weight``); None for buffers llama.cpp recomputes. Raises for unknown tensors."""
    if _IGNORED.fullmatch(key):
        return None
    module, _, param = key.rpartition(".")
    bare = re.sub(r"^(model|transformer)\.", "", module)
    pattern = re.sub(r"^(layers|h)\.(\d+)\.", r"\1.{n}.", bare)
    table = _GPT2_NAMES if spec.arch == "gpt2" else _DECODER_NAMES
    if pattern not in table or param not in ("weight", "bias"):
        raise ValueError(f"tensor {key!r} has no GGUF counterpart for a {spec.model_type} model; the checkpoint "
                         f"holds tensors this converter does not know (a modified architecture?)")
    layer = re.match(r"^(?:layers|h)\.(\d+)\.", bare)
    return table[pattern].format(n=layer.group(1) if layer else "") + "." + param


@dataclass(frozen=True)
class Transform:
    """How one tensor is changed on the way to GGUF (applied in this order after any adapter merge)."""

    transpose: bool = False  # GPT-2 Conv1D [in, out] -> [out, in]
    interleave_heads: int = 0  # llama rope: number of heads whose rows are interleaved (0: none)
    add_one: bool = False  # gemma norms


def transform_for(spec: ModelSpec, name: str) -> Transform:
    """The transform of the tensor named ``name`` in the GGUF file."""
    if spec.arch == "gpt2":
        return Transform(transpose=name.endswith(".weight") and name.split(".")[-2] in _GPT2_CONV1D)
    if spec.arch == "llama" and re.fullmatch(r"blk\.\d+\.attn_q\.(weight|bias)", name):
        return Transform(interleave_heads=spec.n_heads)
    if spec.arch == "llama" and re.fullmatch(r"blk\.\d+\.attn_k\.(weight|bias)", name):
        return Transform(interleave_heads=spec.n_kv_heads)
    if spec.arch == "gemma" and name.endswith("_norm.weight"):
        return Transform(add_one=True)
    return Transform()


def interleave_heads(x: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows ``[n_heads * head_dim, ...]`` from HF's half-split rope order to llama.cpp's pair order."""
    head_dim = x.shape[0] // n_heads
    return x.reshape(n_heads, 2, head_dim // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


# ----------------------------------------------------------------------------- metadata


def _rope_parameters(config: dict) -> dict:
    # transformers 5 keeps rope_theta and the scaling in `rope_parameters`; older configs have
    # `rope_theta` and `rope_scaling` (with "type" or "rope_type").
    params = {"rope_theta": config.get("rope_theta", 10000.0)}
    params.update(config.get("rope_scaling") or {})
    params.update(config.get("rope_parameters") or {})
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def hyperparameters(spec: ModelSpec, n_vocab: int, where: str = "config.json") -> dict[str, Value]:
    """``<arch>.*`` metadata with llama.cpp's exact types (u32 sizes, f32 epsilons and rope bases)."""
    a, c = spec.arch, spec.config
    if a == "gpt2":
        return {
            f"{a}.context_length": u32(_field(c, where, "n_positions")),
            f"{a}.embedding_length": u32(c["n_embd"]),
            f"{a}.feed_forward_length": u32(c.get("n_inner") or 4 * c["n_embd"]),
            f"{a}.block_count": u32(spec.n_layers),
            f"{a}.attention.head_count": u32(spec.n_heads),
            f"{a}.attention.layer_norm_epsilon": f32(c.get("layer_norm_epsilon", 1e-5)),
            f"{a}.vocab_size": u32(n_vocab),
        }
    rope = _rope_parameters(c)
    rope_dim = spec.head_dim
    if a == "phi3":
        rope_dim = int(spec.head_dim * rope.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0)))
    meta = {
        f"{a}.context_length": u32(_field(c, where, "max_position_embeddings")),
        f"{a}.embedding_length": u32(c["hidden_size"]),
        f"{a}.block_count": u32(spec.n_layers),
        f"{a}.feed_forward_length": u32(_field(c, where, "intermediate_size")),
        f"{a}.attention.head_count": u32(spec.n_heads),
        f"{a}.attention.head_count_kv": u32(spec.n_kv_heads),
        f"{a}.attention.key_length": u32(spec.head_dim),
        f"{a}.attention.value_length": u32(spec.head_dim),
        f"{a}.attention.layer_norm_rms_epsilon": f32(_field(c, where, "rms_norm_eps")),
        f"{a}.rope.dimension_count": u32(rope_dim),
        f"{a}.rope.freq_base": f32(rope["rope_theta"]),
        f"{a}.vocab_size": u32(n_vocab),
    }
    kind = rope["rope_type"]
    if kind not in _ROPE_TYPES[a]:
        raise ValueError(f"{where}: rope type {kind!r} is not supported for {spec.model_type} GGUF export; "
                         f"supported: {', '.join(_ROPE_TYPES[a])}")
    if kind in ("linear", "yarn"):
        meta[f"{a}.rope.scaling.type"] = string(kind)
        meta[f"{a}.rope.scaling.factor"] = f32(_field(rope, where, "factor"))
    if kind == "yarn":
        meta[f"{a}.rope.scaling.original_context_length"] = u32(_field(rope, where, "original_max_position_embeddings"))
        for hf_key, gguf_key in (("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow")):
            if rope.get(hf_key) is not None:
                meta[f"{a}.rope.scaling.{gguf_key}"] = f32(rope[hf_key])
    if a == "phi3":
        if c.get("original_max_position_embeddings"):
            meta[f"{a}.rope.scaling.original_context_length"] = u32(c["original_max_position_embeddings"])
        if c.get("sliding_window"):
            meta[f"{a}.attention.sliding_window"] = u32(c["sliding_window"])
    return meta


def llama3_rope_freqs(spec: ModelSpec) -> np.ndarray | None:
    """The ``rope_freqs.weight`` tensor of Llama-3-style rope scaling (``[head_dim / 2]`` f32), else None.

    Per frequency ``f`` with wavelength ``w = 2π / f`` and original context ``L``: the factor is 1 when
    ``w < L / high_freq_factor``, ``factor`` when ``w > L / low_freq_factor``, and in between
    ``1 / ((1 - s) / factor + s)`` with ``s = (L / w - low) / (high - low)``. llama.cpp divides the
    frequencies by these factors, as transformers' ``llama3`` rope does.
    """
    rope = _rope_parameters(spec.config)
    if rope["rope_type"] != "llama3":
        return None
    dim = spec.head_dim
    freqs = 1.0 / (float(rope["rope_theta"]) ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    context = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs:
        wavelength = 2 * math.pi / freq
        if wavelength < context / high:
            factors.append(1.0)
        elif wavelength > context / low:
            factors.append(factor)
        else:
            smooth = (context / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)
