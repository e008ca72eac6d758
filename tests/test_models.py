"""The tiny offline model and the loader."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch

from minift.lora.config import LoraConfig
from minift.lora.layers import apply_lora
from minift.model.load import (
    build_tiny_model,
    load_model_and_tokenizer,
    resolve_model_path,
    tiny_model_dir,
)


def test_tiny_build_is_bit_identical(tmp_path, tiny_dir):
    build_tiny_model(tmp_path / "again")
    names = sorted(p.name for p in tiny_dir.iterdir())
    assert "model.safetensors" in names and "tokenizer.json" in names
    assert names == sorted(p.name for p in (tmp_path / "again").iterdir())
    for name in names:
        assert (tmp_path / "again" / name).read_bytes() == (tiny_dir / name).read_bytes(), name


def test_a_model_built_by_any_rank_of_a_process_group_keeps_its_weights(tmp_path, tiny_dir):
    """transformers writes save_pretrained's weights from rank 0 only when a process group exists; the tiny model
    built by rank 1 (each process of a first launch builds its own cache) must still be whole."""
    script = tmp_path / "build.py"
    script.write_text("import sys, torch.distributed as dist\n"
                      "from minift.model.load import build_tiny_model\n"
                      "dist.init_process_group('gloo')\n"
                      "if dist.get_rank() == 1:\n"
                      "    build_tiny_model(sys.argv[1])\n"
                      "dist.barrier()\n"
                      "dist.destroy_process_group()\n")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
                    str(tmp_path / "built")], check=True, capture_output=True, timeout=180)
    built = sorted(p.name for p in (tmp_path / "built").iterdir())
    assert built == sorted(p.name for p in tiny_dir.iterdir()) and "model.safetensors" in built
    assert (tmp_path / "built" / "model.safetensors").read_bytes() == (tiny_dir / "model.safetensors").read_bytes()


def test_tiny_resolves_to_cache_and_loads(tiny_dir, minift_cache):
    assert tiny_model_dir() == tiny_dir and tiny_dir.parent == minift_cache
    model, tokenizer = load_model_and_tokenizer("tiny")
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (2, 64, 4, 2)
    assert cfg.vocab_size == len(tokenizer)
    # Words of the demo tasks are single tokens; the tokenizer adds no prefix space.
    assert len(tokenizer(" banana").input_ids) == 1 and len(tokenizer("banana").input_ids) == 1
    assert tokenizer.decode(tokenizer("Reverse the words: cat dog").input_ids) == "Reverse the words: cat dog"
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")  # special tokens stay single tokens


def test_module_summary_command(tiny_dir, minift_cache):
    out = subprocess.run([sys.executable, "-m", "minift.model.load"], capture_output=True, text=True, check=True).stdout
    assert "LlamaForCausalLM" in out and "185,920" in out and str(tiny_dir) in out


def test_missing_and_empty_model_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no model: no config.json"):
        load_model_and_tokenizer(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model_and_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_path("./relative/missing")
    assert resolve_model_path("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"  # a hub id passes through untouched
    with pytest.raises(ValueError, match="quantization"):
        load_model_and_tokenizer("tiny", quantization="3bit")
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model_and_tokenizer("tiny", dtype="float8")


def test_pad_token_is_set_when_missing(tiny_dir, tmp_path):
    model, tokenizer = load_model_and_tokenizer(str(tiny_dir))
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)
    model.config.pad_token_id = None
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    _, fresh = load_model_and_tokenizer(str(tmp_path))
    assert fresh.pad_token == fresh.eos_token == "<|im_end|>"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dtype(tiny_dir, dtype):
    model, _ = load_model_and_tokenizer(str(tiny_dir), dtype=dtype)
    assert next(model.parameters()).dtype == getattr(torch, dtype)


def test_gradient_checkpointing_reaches_lora(tiny_dir, batch):
    """With a frozen base, reentrant checkpointing would give LoRA no gradient; minift uses non-reentrant, through
    transformers' current API (its deprecated one warns on every run)."""
    grads = {}
    for ckpt in (False, True):
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            model, _ = load_model_and_tokenizer(str(tiny_dir), gradient_checkpointing=ckpt)
        apply_lora(model, LoraConfig(r=4, init_lora_weights=False))
        model.train()
        model(batch, labels=batch, use_cache=False).loss.backward()
        grads[ckpt] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert model.model.gradient_checkpointing == ckpt
    assert grads[True].keys() == grads[False].keys()
    for name, g in grads[False].items():
        assert grads[True][name] is not None and torch.allclose(grads[True][name], g, atol=1e-6), name
