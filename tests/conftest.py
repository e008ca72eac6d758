"""Shared fixtures: the tiny Llama (built by minift itself) and a tiny GPT-2 (Conv1D), both on disk."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def minift_cache(tmp_path_factory):
    """Build everything into a per-run cache so tests never touch the user's cache or the network."""
    cache = tmp_path_factory.mktemp("minift-cache")
    os.environ["MINIFT_CACHE"] = str(cache)
    os.environ["HF_HUB_OFFLINE"] = "1"
    return cache


@pytest.fixture(scope="session")
def tiny_dir(minift_cache):
    from minift.models import tiny_model_dir

    return tiny_model_dir()


@pytest.fixture(scope="session")
def gpt2_dir(tiny_dir, tmp_path_factory):
    """A random tiny GPT-2 (Conv1D projections) sharing the tiny tokenizer."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    out = tmp_path_factory.mktemp("tiny-gpt2")
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=256,
                        initializer_range=0.1, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def llama(tiny_dir):
    from minift.models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(str(tiny_dir), dtype="float32")
    return model.eval()


@pytest.fixture
def gpt2(gpt2_dir):
    from minift.models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(str(gpt2_dir), dtype="float32")
    return model.eval()


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, 800, (2, 12), generator=g)
