"""Load a base model and tokenizer; build the offline ``tiny`` model that every recipe defaults to.

``python -m minift.model.load [NAME_OR_PATH]`` prints a summary of a model (default: ``tiny``).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import torch

from minift.data.encode import CHATML_TEMPLATE
from minift.model.files import cache_dir, check_model_dir, save_on_any_process, set_usual_modes
from minift.model.from_gguf import gguf_model_dir, is_gguf_file
from minift.model.smollm2 import smollm2_gguf

logger = logging.getLogger(__name__)

TINY = "tiny"
SMOLLM2 = "smollm2"  # SmolLM2-135M-Instruct, from the GGUF in a PyPI package (minift.model.smollm2)
TINY_BUILDER_VERSION = 2  # bump when the recipe below changes, so caches rebuild
TINY_VOCAB_SIZE = 1024
TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def _tiny_corpus() -> str:
    return resources.files("minift.model").joinpath("tiny_corpus.txt").read_text(encoding="utf-8")


def tiny_model_dir() -> Path:
    """The directory of the tiny model, building it on first use (a second or two)."""
    import transformers

    corpus = _tiny_corpus()
    key = f"{TINY_BUILDER_VERSION}|{transformers.__version__}|{torch.__version__}|{corpus}"
    target = cache_dir() / f"tiny-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-build-", dir=target.parent))
    try:
        build_tiny_model(tmp, corpus)
        set_usual_modes(tmp)
        try:
            os.rename(tmp, target)  # atomic; another process may have won the race, which is fine
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("built the tiny model in %s", target)
    return target


def build_tiny_model(out_dir: str | Path, corpus: str | None = None) -> None:
    """Write a deterministic tiny Llama (2 layers, hidden 64, 4 heads / 2 KV heads) and its tokenizer.

    The byte-level BPE tokenizer is trained in-process on ``corpus`` (default: the bundled corpus
    covering the demo tasks). Weights use std 0.1 rather than the usual 0.02 (0.5 for the output
    head): with a small frozen head a random model only produces near-flat distributions and LoRA
    barely learns; with these the demo task is learned by LoRA alone.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = _tiny_corpus() if corpus is None else corpus
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus.splitlines(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML_TEMPLATE
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.1,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    with torch.no_grad():
        # A frozen head with std 0.1 caps the logit margin a LoRA can reach (|h| <= 8 after the final norm);
        # std 0.5 leaves room for confident predictions, so LoRA alone learns the demo task.
        model.lm_head.weight.mul_(5.0)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    save_on_any_process(model, out_dir)
    tokenizer.save_pretrained(out_dir)


def resolve_model_path(name_or_path: str) -> str:
    """``tiny`` -> the built tiny model; a ``.gguf`` file -> its dequantized copy (built once, then cached);
    ``smollm2`` -> SmolLM2-135M-Instruct's GGUF, fetched from the package index once, likewise; an existing
    directory -> itself (checked); else a hub id."""
    if name_or_path == TINY:
        return str(tiny_model_dir())
    if name_or_path == SMOLLM2:
        return str(gguf_model_dir(smollm2_gguf()))
    path = Path(name_or_path).expanduser()
    if is_gguf_file(path):
        return str(gguf_model_dir(path))
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{path} is a file; pass the model's directory (with config.json and weights) or a "
                             f".gguf file")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} holds no model: no config.json. Pass a directory written by save_pretrained, a .gguf file, "
                f"a hub id such as 'Qwen/Qwen2.5-0.5B', or 'tiny' for the built-in test model."
            )
        return str(path)
    if not _HUB_ID.fullmatch(name_or_path) or name_or_path.startswith("."):
        raise FileNotFoundError(f"model directory {name_or_path} does not exist (and it is not a hub id)")
    return name_or_path


def _to_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(_DTYPES))} or 'auto'")
    return _DTYPES[dtype]


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False):
    """The tokenizer of a model directory, hub id, or ``tiny``, with a pad token (the EOS token when it had
    none). Loads no weights, so recipes read and check their data with it before the model loads."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise FileNotFoundError(
            f"could not load a tokenizer from {name_or_path!r}: {err}. Check the path or hub id "
            f"(and HF_TOKEN for gated models), or use 'tiny' for the built-in offline model."
        ) from err
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer of {name_or_path} has neither a pad nor an EOS token; add one first")
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("tokenizer had no pad token; using the EOS token %r", tokenizer.eos_token)
    return tokenizer


TASKS = ("causal_lm", "seq_cls")


def load_model(
    name_or_path: str,
    tokenizer,
    *,
    dtype: str | torch.dtype | None = "float32",
    quantization: str | None = None,
    gradient_checkpointing: bool = False,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    task: str = "causal_lm",
):
    """Load a causal LM from a directory, a hub id, or ``tiny`` (its pad token id taken from ``tokenizer``).
    ``task="seq_cls"``: the same base with a one-output sequence-classification head (``score``, new unless the
    directory has one), as a reward model.

    ``quantization``: None, ``"4bit"`` (NF4, double quantization; compute in ``dtype``) or
    ``"8bit"`` (LLM.int8), via bitsandbytes. Gradient checkpointing uses ``use_reentrant=False`` so
    that gradients reach adapters of a frozen base.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if quantization not in (None, "4bit", "8bit"):
        raise ValueError(f"quantization must be None, '4bit' or '8bit', got {quantization!r}")
    path = resolve_model_path(name_or_path)
    torch_dtype = _to_dtype(dtype)
    kwargs = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization:
        kwargs["quantization_config"] = _bnb_config(quantization, torch_dtype)
    if task == "seq_cls":
        kwargs.update(num_labels=1, pad_token_id=tokenizer.pad_token_id)
    auto = AutoModelForSequenceClassification if task == "seq_cls" else AutoModelForCausalLM
    if Path(path).is_dir():
        check_model_dir(path)
    try:
        model = auto.from_pretrained(path, **kwargs)
    except OSError as err:
        raise FileNotFoundError(
            f"could not load a model from {name_or_path!r}: {err}. Check the path or hub id "
            f"(and HF_TOKEN for gated models), or use 'tiny' for the built-in offline model."
        ) from err
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def load_model_and_tokenizer(name_or_path: str, **options):
    """:func:`load_tokenizer` then :func:`load_model` (same options)."""
    tokenizer = load_tokenizer(name_or_path, trust_remote_code=options.get("trust_remote_code", False))
    return load_model(name_or_path, tokenizer, **options), tokenizer


def _bnb_config(quantization: str, compute_dtype):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ImportError(f"quantization={quantization!r} needs bitsandbytes: pip install bitsandbytes") from err
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype if isinstance(compute_dtype, torch.dtype) else torch.bfloat16,
    )


def describe_model(model, tokenizer, source: str) -> str:
    """A short human-readable summary: architecture, sizes, parameter count, tokenizer."""
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    sample = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Reverse the words: cat dog"}], tokenize=False, add_generation_prompt=True
    ) if tokenizer.chat_template else "(no chat template)"
    rows = [
        ("source", source),
        ("architecture", type(model).__name__),
        ("parameters", f"{n_params:,}"),
        ("layers", getattr(cfg, "num_hidden_layers", "?")),
        ("hidden size", getattr(cfg, "hidden_size", "?")),
        ("heads / kv heads", f"{getattr(cfg, 'num_attention_heads', '?')} / {getattr(cfg, 'num_key_value_heads', '?')}"),
        ("vocab", f"{len(tokenizer)} tokens ({type(tokenizer).__name__})"),
        ("dtype", str(next(model.parameters()).dtype).replace("torch.", "")),
        ("eos / pad", f"{tokenizer.eos_token!r} / {tokenizer.pad_token!r}"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines.append("chat prompt:")
    lines += ["  " + line for line in repr(sample).strip("'").split("\\n")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Load a model (default: the built-in tiny model) and summarize it.")
    parser.add_argument("model", nargs="?", default=TINY, help="'tiny', a model directory, or a hub id")
    args = parser.parse_args(argv)
    model, tokenizer = load_model_and_tokenizer(args.model)
    print(describe_model(model, tokenizer, resolve_model_path(args.model)))


if __name__ == "__main__":
    main()
