"""Convert a Hugging Face model directory (safetensors) to GGUF, optionally merging adapters, or write a
llama.cpp LoRA GGUF; optionally an Ollama ``Modelfile``. ``tools/convert_to_gguf.py`` is its CLI.

Streaming: every tensor is planned from the safetensors headers first (names, shapes, types, so all
errors come before any byte is written), then the metadata is written, then each tensor's data is
read from the memory-mapped checkpoint in chunks of rows, converted and written, and the chunk's
pages are dropped from the mapping. Peak memory is about one chunk plus, for tensors that must be
whole (a transposed GPT-2 Conv1D, a merged adapter), one tensor. Tensors whose type does not change
are copied straight through. The checkpoint is read by ``minift.export.gguf.source``, which checks every
safetensors header before reading any data.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from minift.export.gguf.arch import (
    ModelSpec,
    Transform,
    gguf_name,
    hyperparameters,
    interleave_heads,
    llama3_rope_freqs,
    model_spec,
    transform_for,
)
from minift.export.gguf.source import DTYPES, SafetensorsSource, SourceTensor, is_int
from minift.export.gguf.tokenizer import tokenizer_metadata
from minift.export.gguf.writer import (
    DEFAULT_ALIGNMENT,
    Tensor,
    TensorType,
    Value,
    encode_rows,
    f32,
    string,
    u32,
    write_gguf,
)

OUTTYPES = {"f32": TensorType.F32, "f16": TensorType.F16, "bf16": TensorType.BF16, "q8_0": TensorType.Q8_0,
            "q4_0": TensorType.Q4_0}
_FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "bf16": 32}  # llama.cpp's LLAMA_FTYPE_ALL_F32 / MOSTLY_*
CHUNK_VALUES = 1 << 16  # values converted at a time: the temporaries stay in the CPU's L2 cache (2x faster)
COPY_BYTES = 1 << 24  # bytes copied at a time when the type does not change
@dataclass
class Planned:
    """One output tensor: where its data comes from and what happens to it on the way."""

    name: str
    shape: tuple[int, ...]  # PyTorch order, after the transform
    type: TensorType
    source: SourceTensor | None = None
    transform: Transform = Transform()
    merges: list = field(default_factory=list)
    values: np.ndarray | None = None  # a tensor computed here (rope_freqs, LoRA tensors)


def tensor_type(outtype: str, name: str, shape: tuple[int, ...]) -> TensorType:
    """1-D tensors (norms, biases) and position embeddings stay F32; rows that do not fill 32-value blocks
    fall back to F16 when quantizing."""
    if len(shape) < 2 or name.startswith("position_embd"):
        return TensorType.F32
    wanted = OUTTYPES[outtype]
    if wanted in (TensorType.Q8_0, TensorType.Q4_0) and shape[-1] % 32:
        return TensorType.F16
    return wanted


def _order(name: str) -> tuple:
    block = re.match(r"blk\.(\d+)\.", name)
    if block:
        return 1, int(block.group(1)), name
    return (0 if name.startswith(("token_embd", "position_embd", "rope_freqs")) else 2), 0, name


def _shape_problem(spec: ModelSpec, t: SourceTensor, name: str) -> str | None:
    """A tensor whose shape or layer disagrees with config.json (llama.cpp would refuse or misread the model)."""
    hidden = spec.config.get("n_embd" if spec.arch == "gpt2" else "hidden_size")
    block = re.match(r"blk\.(\d+)\.", name)
    if block and int(block.group(1)) >= spec.n_layers:
        return f"it belongs to layer {block.group(1)}, but config.json has {spec.n_layers} layers"
    if not is_int(hidden):
        return None
    if name in ("token_embd.weight", "output.weight", "position_embd.weight") and (
            len(t.shape) != 2 or t.shape[1] != hidden):
        return f"shape {list(t.shape)} is not [rows, hidden_size {hidden}]"
    if name == "token_embd.weight" and is_int(spec.config.get("vocab_size")) and \
            t.shape[0] != spec.config["vocab_size"]:
        return f"it has {t.shape[0]} rows, but config.json's vocab_size is {spec.config['vocab_size']}"
    if re.fullmatch(r"(blk\.\d+\.(attn|ffn)_norm|output_norm)\.weight", name) and list(t.shape) != [hidden]:
        return f"shape {list(t.shape)} is not [hidden_size {hidden}]"
    if block and len(t.shape) == 2 and hidden not in t.shape:
        return f"shape {list(t.shape)} has no dimension of hidden_size {hidden}"
    return None


def plan_model(spec: ModelSpec, source: SafetensorsSource, outtype: str, merges: dict) -> list[Planned]:
    """Every tensor of the output from the checkpoint headers alone (``merges``: checkpoint key -> merges)."""
    plans = []
    for key, t in source.tensors.items():
        name = gguf_name(spec, key)
        if name is None or (spec.tied and name == "output.weight"):
            continue  # a buffer llama.cpp recomputes, or the tied head (llama.cpp reuses token_embd)
        problem = _shape_problem(spec, t, name)
        if problem:
            raise ValueError(f"{t.file}: tensor {key}: {problem}; the checkpoint does not match its config.json")
        transform = transform_for(spec, name)
        shape = (t.shape[1], t.shape[0]) if transform.transpose else t.shape
        plans.append(Planned(name, shape, tensor_type(outtype, name, shape), t, transform, merges.get(key, [])))
    freqs = llama3_rope_freqs(spec)
    if freqs is not None:
        plans.append(Planned("rope_freqs.weight", freqs.shape, TensorType.F32, values=freqs))
    return sorted(plans, key=lambda p: _order(p.name))


def _finish(x: np.ndarray, p: Planned) -> np.ndarray:
    """Rows of the weight in ``[out, in]`` orientation -> their GGUF bytes (interleave, +1, encode)."""
    if p.transform.interleave_heads:  # whole heads: chunks are cut at multiples of head_dim
        x = interleave_heads(x, x.shape[0] // (p.source.shape[0] // p.transform.interleave_heads))
    if p.transform.add_one:
        x = x + np.float32(1)
    return encode_rows(x, p.type)


def _row_step(p: Planned, rows: int, cols: int) -> int:
    """Rows converted at a time: about ``CHUNK_VALUES`` values, cut at whole heads where heads are interleaved."""
    step = max(1, CHUNK_VALUES // cols)
    if p.transform.interleave_heads:
        head_dim = rows // p.transform.interleave_heads
        step = max(1, step // head_dim) * head_dim
    return step


def tensor_chunks(source: SafetensorsSource, p: Planned):
    """Yield the bytes of planned tensor ``p`` in chunks, releasing the source pages behind them."""
    if p.values is not None:
        yield encode_rows(p.values.reshape(1, -1) if p.values.ndim == 1 else p.values, p.type)
        return
    t = p.source
    rows, cols = source.rows_and_cols(t)
    if not p.merges and p.transform == Transform() and DTYPES[t.dtype][1] == p.type:
        nbytes = rows * cols * np.dtype(DTYPES[t.dtype][0]).itemsize
        for start in range(0, nbytes, COPY_BYTES):
            yield source.raw(t, start, min(start + COPY_BYTES, nbytes))
            source.release(t, start, min(start + COPY_BYTES, nbytes))
        return
    if p.merges or p.transform.transpose:  # needs the whole tensor: a transpose or an adapter merge
        from minift.export.gguf.lora import apply_merges

        x = source.read(t, 0, rows)
        x = x.reshape(t.shape).T if p.transform.transpose else x
        x = apply_merges(x, p.merges) if p.merges else np.ascontiguousarray(x)
        source.release(t, 0, rows * cols * np.dtype(DTYPES[t.dtype][0]).itemsize)
        step = _row_step(p, *x.shape)
        for start in range(0, x.shape[0], step):
            yield _finish(x[start:start + step], p)
        return
    step = _row_step(p, rows, cols)
    itemsize = np.dtype(DTYPES[t.dtype][0]).itemsize
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        yield _finish(source.read(t, start, stop), p)
        source.release(t, start * cols * itemsize, stop * cols * itemsize)


def _general(spec: ModelSpec, name: str, kind: str, outtype: str) -> dict[str, Value]:
    return {"general.architecture": string(spec.arch), "general.type": string(kind), "general.name": string(name),
            "general.file_type": u32(_FILE_TYPES[outtype]), "general.quantization_version": u32(2),
            "general.alignment": u32(DEFAULT_ALIGNMENT)}


def read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} holds no model: config.json is missing (save it with save_pretrained)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}, line {err.lineno}: invalid JSON ({err.msg})") from err


def convert(model_dir: str | Path, out: str | Path, *, outtype: str = "f16", adapters: tuple | list = (),
            lora_only: bool = False, ollama: bool = False, progress: bool = False) -> Path:
    """Write ``out`` (GGUF) from the HF model in ``model_dir``; see the module docstring.

    ``adapters`` are merged in order; with ``lora_only`` they are written as a llama.cpp LoRA GGUF
    instead (``model_dir`` is then the base they were trained on). ``ollama`` also writes
    ``Modelfile`` next to ``out``. Returns ``out``; raises ValueError / FileNotFoundError on bad input,
    leaving no partial file.
    """
    model_dir, out = Path(model_dir), Path(out)
    if outtype not in OUTTYPES:
        raise ValueError(f"unknown outtype {outtype!r}; use one of {', '.join(OUTTYPES)}")
    if out.is_dir():
        raise ValueError(f"{out} is a directory; give the path of the .gguf file to write")
    if lora_only and not adapters:
        raise ValueError("--lora-only writes adapters: give at least one with --adapter DIR")
    inputs = {f.resolve() for d in (model_dir, *map(Path, adapters)) if d.is_dir() for f in d.iterdir()
              if f.is_file() and f.suffix != ".gguf"}
    if out.resolve() in inputs:
        raise ValueError(f"{out} is one of the conversion's input files; write the GGUF to a new .gguf path")
    if lora_only and ollama:
        raise ValueError("--ollama applies to full models; for an adapter add DEFAULT_ADAPTER to the base model's Modelfile")
    config = read_config(model_dir)
    spec = model_spec(config, str(model_dir / "config.json"))
    source = SafetensorsSource(model_dir)
    name = config.get("_name_or_path") or model_dir.resolve().name
    if lora_only:
        from minift.export.gguf.lora import lora_gguf_tensors

        alpha, arrays = lora_gguf_tensors(adapters, source, spec, model_dir)
        metadata = _general(spec, name, "adapter", outtype)
        metadata.update({"adapter.type": string("lora"), "adapter.lora.alpha": f32(alpha)})
        plans = [Planned(n, a.shape, tensor_type(outtype, n, a.shape), values=a) for n, a in arrays]
    else:
        merges = {}
        if adapters:
            from minift.export.gguf.lora import plan_merges

            merges = plan_merges(adapters, source, spec, model_dir)
        plans = plan_model(spec, source, outtype, merges)
        embedding = next((p for p in plans if p.name == "token_embd.weight"), None)
        if embedding is None:
            raise ValueError(f"{model_dir}: the checkpoint has no token embedding; it is not a complete causal LM")
        metadata = _general(spec, name, "model", outtype)
        metadata.update(hyperparameters(spec, embedding.shape[0], str(model_dir / "config.json")))
        metadata.update(tokenizer_metadata(model_dir, embedding.shape[0], config))
    tensors = [Tensor(p.name, p.shape, p.type, lambda p=p: tensor_chunks(source, p)) for p in plans]
    write_gguf(out, metadata, tensors, progress=progress)
    if ollama:
        write_modelfile(out, metadata)
    return out


# ----------------------------------------------------------------------------- Ollama

# Ollama's Go-template form of a ChatML chat template (messages include the system turn).
_CHATML_OLLAMA = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
                  "<|im_start|>assistant\n")


def modelfile_text(gguf_path: Path, metadata: dict[str, Value]) -> str:
    """An Ollama Modelfile for the GGUF: FROM it, a TEMPLATE where the chat template is ChatML, stop tokens."""
    tokens = metadata["tokenizer.ggml.tokens"][1][1]
    stops = [tokens[metadata["tokenizer.ggml.eos_token_id"][1]]]
    template = metadata.get("tokenizer.chat_template", (None, None))[1]
    lines = [f"FROM ./{gguf_path.name}"]
    if template and "<|im_start|>" in template and "<|im_end|>" in template:
        lines.append(f'TEMPLATE """{_CHATML_OLLAMA}"""')
        stops.append("<|im_end|>")
    elif template:
        lines.append(f"# The chat template is not ChatML, so it is not translated to a Go TEMPLATE; it is embedded "
                     f"in {gguf_path.name} (tokenizer.chat_template), where Ollama can read it.")
    else:
        lines.append("# The model has no chat template: prompts are passed to it as they are.")
    for stop in dict.fromkeys(stops):
        escaped = stop.replace("\\", "\\\\").replace('"', '\\"')
        lines.append(f'PARAMETER stop "{escaped}"')
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: Path, metadata: dict[str, Value]) -> Path:
    """Write ``Modelfile`` next to ``gguf_path`` (atomically) and return its path."""
    path = gguf_path.parent / "Modelfile"
    tmp = path.with_name(f".Modelfile.{os.getpid()}.tmp")
    tmp.write_text(modelfile_text(gguf_path, metadata), encoding="utf-8")
    os.replace(tmp, path)
    return path

