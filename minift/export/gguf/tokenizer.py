"""Tokenizer metadata for GGUF, read straight from a model directory's tokenizer files.

- Byte-level BPE (``tokenizer.json``, ``ByteLevel`` pre-tokenizer) -> ``tokenizer.ggml.model = "gpt2"``:
  the vocabulary strings as they are, merges as ``"left right"`` strings, and ``tokenizer.ggml.pre``
  chosen from the pre-tokenizer's actual configuration (llama.cpp's own converter only knows the hashes
  of published tokenizers, so it refuses every tokenizer trained from scratch).
- SentencePiece (``tokenizer.model``, or a ``tokenizer.json`` BPE with ``byte_fallback``) ->
  ``"llama"`` with scores and byte tokens ``<0xXX>``.

Token types (i32): 1 normal, 2 unknown, 3 control (special tokens), 4 user-defined (other added
tokens), 5 unused (``[PAD{i}]`` rows beyond the tokenizer), 6 byte. Special-token ids are u32.
"""

from __future__ import annotations

import json
import logging
import re
import struct
from collections import Counter
from pathlib import Path

from minift.export.gguf.writer import Value, ValueType, array, boolean, string, u32

logger = logging.getLogger(__name__)

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
PAD_SCORE = -10000.0  # the score of [PAD{i}] tokens, as llama.cpp's converter writes it

# Split regexes of tokenizer.json files -> llama.cpp pre-tokenizer names.
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_SPLIT_REGEXES = {
    _GPT2_REGEX: "gpt-2",
    _GPT2_REGEX + r"|\s+": "gpt-2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
}
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}, line {err.lineno}: invalid JSON ({err.msg})") from err


def tokenizer_metadata(model_dir: str | Path, n_vocab: int, config: dict) -> dict[str, Value]:
    """All ``tokenizer.*`` metadata of the model in ``model_dir`` for an embedding of ``n_vocab`` rows."""
    model_dir = Path(model_dir)
    json_path, sp_path = model_dir / "tokenizer.json", model_dir / "tokenizer.model"
    config_path = model_dir / "tokenizer_config.json"
    tok_config = _read_json(config_path) if config_path.is_file() else {}
    tok_json = _read_json(json_path) if json_path.is_file() else None
    added = _added_tokens(tok_json, tok_config)
    if sp_path.is_file():
        meta, tokens = _sentencepiece_model(sp_path, added)
    elif tok_json is None:
        raise FileNotFoundError(f"{model_dir} has no tokenizer (tokenizer.json or tokenizer.model); the GGUF must "
                                f"embed one. Save it next to the weights: tokenizer.save_pretrained('{model_dir}')")
    elif tok_json["model"].get("type") == "BPE" and tok_json["model"].get("byte_fallback"):
        meta, tokens = _sentencepiece_json(tok_json, added, json_path)
    else:
        meta, tokens = _byte_level_bpe(tok_json, added, json_path)
    token_list, types = _pad_and_check(tokens, n_vocab, model_dir)
    meta["tokenizer.ggml.tokens"] = array(ValueType.STRING, token_list)
    if "tokenizer.ggml.scores" in meta:  # SentencePiece scores; padding rows never win a merge
        scores = meta["tokenizer.ggml.scores"][1][1]
        meta["tokenizer.ggml.scores"] = array(ValueType.FLOAT32, scores + [PAD_SCORE] * (n_vocab - len(scores)))
    meta["tokenizer.ggml.token_type"] = array(ValueType.INT32, types)
    meta.update(_special_tokens(token_list, tok_json, tok_config, config, meta["tokenizer.ggml.model"][1], model_dir))
    template = _chat_template(model_dir, tok_config)
    if template:
        meta["tokenizer.chat_template"] = string(template)
    return meta


def _added_tokens(tok_json: dict | None, tok_config: dict) -> dict[int, tuple[str, bool]]:
    """id -> (content, special) of the tokens added on top of the model's vocabulary."""
    if tok_json is not None:
        return {t["id"]: (t["content"], bool(t.get("special"))) for t in tok_json.get("added_tokens", [])}
    decoder = tok_config.get("added_tokens_decoder") or {}
    return {int(i): (t["content"], bool(t.get("special"))) for i, t in decoder.items()}


def _merges(model: dict, where: Path) -> list[str]:
    # tokenizers >= 0.20 stores merges as [left, right] pairs, older versions as "left right" strings.
    merges = []
    for m in model.get("merges", []):
        if isinstance(m, str):
            merges.append(m)
        elif any(" " in part for part in m):
            raise ValueError(f"{where}: merge {m!r} contains a space, which GGUF's 'left right' merges cannot express")
        else:
            merges.append(" ".join(m))
    return merges


def _pre_tokenizer_name(tok_json: dict, where: Path) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for the pre-tokenizer configured in tokenizer.json."""
    pre = tok_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if any(p.get("type") == "ByteLevel" and p.get("add_prefix_space") for p in parts):
        logger.warning("%s: the tokenizer adds a prefix space before the text, llama.cpp does not: the first word of "
                       "a prompt will be split differently", where)
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"  # ByteLevel's built-in regex is GPT-2's
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        regex = (parts[0].get("pattern") or {}).get("Regex")
        if regex in _SPLIT_REGEXES:
            return _SPLIT_REGEXES[regex]
    described = " + ".join(kinds) or "none"
    raise ValueError(f"{where}: the pre-tokenizer ({described}) is not one llama.cpp implements, so it would split "
                     f"text differently. Recognized: ByteLevel with the GPT-2 regex (gpt-2), Split with the "
                     f"Llama-3 regex + ByteLevel (llama-bpe), Split with the Qwen2 regex + ByteLevel (qwen2).")


def _byte_level_bpe(tok_json: dict, added: dict, where: Path) -> tuple[dict, dict[int, tuple[str, int]]]:
    model = tok_json["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"{where}: a {model.get('type')} tokenizer; GGUF export supports byte-level BPE and "
                         f"SentencePiece tokenizers")
    meta = {"tokenizer.ggml.model": string("gpt2"), "tokenizer.ggml.pre": string(_pre_tokenizer_name(tok_json, where))}
    tokens = {i: (s, NORMAL) for s, i in model["vocab"].items()}
    tokens.update({i: (s, CONTROL if special else USER_DEFINED) for i, (s, special) in added.items()})
    meta["tokenizer.ggml.merges"] = array(ValueType.STRING, _merges(model, where))
    return meta, tokens


def _sentencepiece_json(tok_json: dict, added: dict, where: Path) -> tuple[dict, dict[int, tuple[str, int]]]:
    """A SentencePiece BPE exported to tokenizer.json (byte_fallback): scores from the merge ranks."""
    model = tok_json["model"]
    merges = _merges(model, where)
    # llama.cpp's SentencePiece tokenizer merges the pair whose result has the highest score first, so
    # a token made by merge number k scores -k: earlier merges win, as in BPE.
    rank = {}
    for k, merge in enumerate(merges):
        rank.setdefault(merge.replace(" ", ""), k)
    tokens, scores = {}, {}
    for s, i in model["vocab"].items():
        kind = BYTE if _BYTE_TOKEN.fullmatch(s) else UNKNOWN if s == model.get("unk_token") else NORMAL
        tokens[i], scores[i] = (s, kind), -float(rank.get(s, 0))
    tokens.update({i: (s, CONTROL if special else USER_DEFINED) for i, (s, special) in added.items()})
    normalizer = json.dumps(tok_json.get("normalizer") or {}) + json.dumps(tok_json.get("pre_tokenizer") or {})
    add_space = '"Prepend"' in normalizer or re.search(r'"prepend_scheme": "(first|always)"', normalizer) is not None
    meta = {"tokenizer.ggml.model": string("llama"), "tokenizer.ggml.pre": string("default"),
            "tokenizer.ggml.scores": array(ValueType.FLOAT32, [scores.get(i, 0.0) for i in range(max(tokens) + 1)]),
            "tokenizer.ggml.add_space_prefix": boolean(add_space)}
    return meta, tokens


def _proto_fields(buf: bytes):
    """(field number, value) pairs of a protobuf message: ints for varints, bytes for the rest."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, value


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        result |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return result, pos


def _sentencepiece_model(path: Path, added: dict) -> tuple[dict, dict[int, tuple[str, int]]]:
    """Parse tokenizer.model (SentencePiece's ModelProto) without the sentencepiece package.

    ModelProto: 1 = repeated SentencePiece {1 piece, 2 score (f32), 3 type}, 2 = TrainerSpec
    {3 model_type: 1 unigram, 2 BPE}, 3 = NormalizerSpec {3 add_dummy_prefix}. SentencePiece's piece
    types use the same numbers as GGUF's token types.
    """
    tokens, scores, model_type, add_prefix = {}, [], 1, True
    try:
        for field, value in _proto_fields(path.read_bytes()):
            if field == 1:
                piece = dict(_proto_fields(value))
                tokens[len(scores)] = (piece.get(1, b"").decode("utf-8"), piece.get(3, NORMAL))
                scores.append(struct.unpack("<f", piece[2])[0] if 2 in piece else 0.0)
            elif field == 2:
                model_type = dict(_proto_fields(value)).get(3, 1)
            elif field == 3:
                add_prefix = bool(dict(_proto_fields(value)).get(3, 1))
    except (IndexError, ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a readable SentencePiece model ({err})") from err
    if model_type != 2:
        raise ValueError(f"{path} is a {'unigram' if model_type == 1 else 'non-BPE'} SentencePiece model; llama.cpp's "
                         f"'llama' tokenizer implements SentencePiece BPE only")
    for i, (s, special) in added.items():
        if i >= len(scores) or special:
            tokens[i] = (s, CONTROL if special else USER_DEFINED)
    meta = {"tokenizer.ggml.model": string("llama"), "tokenizer.ggml.pre": string("default"),
            "tokenizer.ggml.scores": array(ValueType.FLOAT32, scores + [0.0] * (max(tokens) + 1 - len(scores))),
            "tokenizer.ggml.add_space_prefix": boolean(add_prefix)}
    return meta, tokens


def _pad_and_check(tokens: dict[int, tuple[str, int]], n_vocab: int, where: Path) -> tuple[list[str], list[int]]:
    """Token strings and types for ids 0..n_vocab-1: gaps become unused ``[PAD{i}]``; strings must be unique."""
    if max(tokens) >= n_vocab:
        raise ValueError(f"{where}: the tokenizer has token id {max(tokens)} but the embedding has only {n_vocab} "
                         f"rows; the tokenizer does not belong to these weights (resize the embeddings first)")
    pairs = [tokens.get(i, (f"[PAD{i}]", UNUSED)) for i in range(n_vocab)]
    strings = [s for s, _ in pairs]
    duplicate = next((s for s, n in Counter(strings).items() if n > 1), None)
    if duplicate is not None:
        ids = [i for i, s in enumerate(strings) if s == duplicate]
        raise ValueError(f"{where}: token {duplicate!r} appears at ids {ids}; llama.cpp requires unique token strings. "
                         f"Remove or rename the duplicate added token in tokenizer.json.")
    return strings, [t for _, t in pairs]


def _token_content(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _template_ends(tok_json: dict | None) -> tuple[str | None, str | None]:
    """The special tokens the post-processor puts first / last around a single sequence."""
    post = (tok_json or {}).get("post_processor") or {}
    parts = post.get("processors", []) if post.get("type") == "Sequence" else [post]
    for part in parts:
        if part.get("type") == "TemplateProcessing" and part.get("single"):
            single = part["single"]
            first, last = single[0].get("SpecialToken"), single[-1].get("SpecialToken")
            return (first or {}).get("id"), (last or {}).get("id")
    return None, None


def _special_tokens(token_list: list[str], tok_json: dict | None, tok_config: dict, config: dict, kind: str,
                    where: Path) -> dict[str, Value]:
    ids = {s: i for i, s in enumerate(token_list)}
    first, last = _template_ends(tok_json)

    def token_id(name: str, template_token: str | None = None) -> int | None:
        content = _token_content(tok_config.get(f"{name}_token")) or template_token
        if content is not None and content in ids:
            return ids[content]
        value = config.get(f"{name}_token_id")
        return value[0] if isinstance(value, list) and value else value

    bos, eos, pad = token_id("bos", first), token_id("eos", last), token_id("pad")
    if eos is None and bos is None:
        raise ValueError(f"{where}: the tokenizer has neither an EOS nor a BOS token; set eos_token in "
                         f"tokenizer_config.json so llama.cpp knows where generation ends")
    # llama.cpp defaults missing ids to 11, a real token: always write all three.
    eos = eos if eos is not None else bos
    meta = {"tokenizer.ggml.bos_token_id": u32(bos if bos is not None else eos),
            "tokenizer.ggml.eos_token_id": u32(eos),
            "tokenizer.ggml.padding_token_id": u32(pad if pad is not None else eos)}
    unk = token_id("unk")
    if unk is not None:
        meta["tokenizer.ggml.unknown_token_id"] = u32(unk)
    add_bos = tok_config.get("add_bos_token", first is not None or (kind == "llama" and tok_json is None))
    meta["tokenizer.ggml.add_bos_token"] = boolean(add_bos)
    meta["tokenizer.ggml.add_eos_token"] = boolean(tok_config.get("add_eos_token", last is not None and last != first))
    return meta


def _chat_template(model_dir: Path, tok_config: dict) -> str | None:
    # transformers >= 4.47 saves the template as chat_template.jinja; older ones inside tokenizer_config.json,
    # either a string or a list of {"name", "template"} of which "default" is the one used.
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = tok_config.get("chat_template")
    if isinstance(template, list):
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template
