"""peft as a reference oracle (test-only): it reads minift's adapters, minift reads its adapters."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_lora import close, logits, randomize_b

from minift.lora.adapters import load_adapter, save_adapter
from minift.lora.config import LoraConfig
from minift.lora.layers import apply_lora, lora_layers
from minift.model.load import load_model_and_tokenizer

peft = pytest.importorskip("peft")

CASES = {
    "lora": dict(r=4, lora_alpha=8),
    "dora+saved-head": dict(r=4, lora_alpha=8, use_dora=True, modules_to_save=["lm_head"]),
    "rslora+patterns": dict(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"q_proj": 2},
                            alpha_pattern={r"layers\.1\.mlp\.down_proj": 3.0}, target_modules=["q_proj", "k_proj", "down_proj"]),
}


def load_with_peft(base_dir, adapter_dir):
    base, _ = load_model_and_tokenizer(str(base_dir))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base, str(adapter_dir))
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "missing adapter keys" in m], messages
    # The only complaint allowed is about minift's own metadata block in adapter_config.json.
    unexpected = [m for m in messages if "Unexpected keyword arguments" in m]
    assert all("['minift']" in m for m in unexpected), unexpected
    return model.eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_loads_minift_adapter(tiny_dir, batch, tmp_path, case):
    model, _ = load_model_and_tokenizer(str(tiny_dir))
    apply_lora(model, LoraConfig(**CASES[case]))
    randomize_b(model)
    if "modules_to_save" in CASES[case]:
        with torch.no_grad():
            model.lm_head.modules_to_save["default"].weight.mul_(1.2)
    ours = logits(model.eval(), batch)
    save_adapter(model, tmp_path / "a")
    theirs_model = load_with_peft(tiny_dir, tmp_path / "a")
    theirs = logits(theirs_model, batch)
    base, _ = load_model_and_tokenizer(str(tiny_dir))
    assert (theirs - logits(base.eval(), batch)).abs().max() > 1e-2  # the adapter is active in peft
    assert close(theirs, ours, 1e-5)


def peft_adapter(base_dir, out_dir, **kwargs):
    base, _ = load_model_and_tokenizer(str(base_dir))
    model = peft.get_peft_model(base, peft.LoraConfig(init_lora_weights=False, **kwargs))
    model.save_pretrained(str(out_dir))
    return logits(model.eval(), torch.randint(3, 800, (2, 12), generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("kwargs", [
    dict(r=4, lora_alpha=8, target_modules="all-linear"),
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True, modules_to_save=["lm_head"]),
    dict(r=8, lora_alpha=4, target_modules=["o_proj", "up_proj"], use_rslora=True, rank_pattern={"up_proj": 2}),
], ids=["all-linear", "dora+saved-head", "rslora+pattern"])
def test_minift_loads_peft_adapter_llama(tiny_dir, batch, tmp_path, kwargs):
    expected = peft_adapter(tiny_dir, tmp_path / "p", **kwargs)
    model, _ = load_model_and_tokenizer(str(tiny_dir))
    load_adapter(model.eval(), tmp_path / "p")
    assert close(logits(model, batch), expected, 1e-5)


def test_minift_loads_peft_adapter_conv1d(gpt2_dir, batch, tmp_path):
    expected = peft_adapter(gpt2_dir, tmp_path / "p", r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                            fan_in_fan_out=True)
    model, _ = load_model_and_tokenizer(str(gpt2_dir))
    load_adapter(model.eval(), tmp_path / "p")
    assert {layer.kind for _, layer in lora_layers(model)} == {"conv1d"}
    assert close(logits(model, batch), expected, 1e-5)


def test_peft_loads_minift_conv1d_adapter(gpt2_dir, batch, tmp_path):
    model, _ = load_model_and_tokenizer(str(gpt2_dir))
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"]))
    randomize_b(model)
    ours = logits(model.eval(), batch)
    save_adapter(model, tmp_path / "a")
    theirs = logits(load_with_peft(gpt2_dir, tmp_path / "a"), batch)
    assert close(theirs, ours, 1e-5)
