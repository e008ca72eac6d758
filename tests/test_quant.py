"""QLoRA: LoRA on bitsandbytes 4-bit (NF4) and 8-bit bases, on CPU."""

from __future__ import annotations

import logging

import pytest
import torch
from test_lora import close, logits, randomize_b

from minift.lora.adapters import load_adapter, save_adapter
from minift.lora.config import LoraConfig
from minift.lora.layers import apply_lora, disable_adapters, lora_layers
from minift.lora.merge import merge_and_save, merge_lora, unmerge_lora
from minift.lora.weights import dequantized_weight
from minift.model.load import load_model_and_tokenizer

pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("quantization,kind", [("4bit", "bnb4"), ("8bit", "bnb8")])
@pytest.mark.parametrize("dora", [False, True])
def test_quantized_base_trains_on_cpu(tiny_dir, batch, quantization, kind, dora):
    model, _ = load_model_and_tokenizer(str(tiny_dir), dtype="float32", quantization=quantization)
    apply_lora(model, LoraConfig(r=8, lora_alpha=16, use_dora=dora))
    assert {layer.kind for _, layer in lora_layers(model)} == {kind}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    losses = []
    for step in range(8):
        loss = model(batch, labels=batch, use_cache=False).loss
        loss.backward()
        if step > 0:  # at step 0, B = 0 so A gets no gradient yet
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses  # it learns to repeat the batch
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p.detach(), frozen[n]), f"quantized base weight {n} changed"


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantized_merge_is_close_and_warns(tiny_dir, batch, quantization, caplog):
    model, _ = load_model_and_tokenizer(str(tiny_dir), dtype="float32", quantization=quantization)
    apply_lora(model, LoraConfig(r=4, lora_alpha=8))
    randomize_b(model)
    with torch.no_grad():  # a delta well above the quantization step, so rounding is visible as small
        for _, layer in lora_layers(model):
            layer.lora_B["default"].weight.mul_(10)
    model.eval()
    adapted = logits(model, batch)
    with disable_adapters(model):
        base = logits(model, batch)
    layer = model.model.layers[0].self_attn.q_proj
    target = dequantized_weight(layer.base_layer, layer.kind) + layer.delta_weight("default").detach()
    with caplog.at_level(logging.WARNING, logger="minift.lora.layers"):
        merge_lora(model)
    assert "re-quantizes" in caplog.text
    merged_w = dequantized_weight(layer.base_layer, layer.kind)
    # NF4 has 16 levels per block: rounding costs ~absmax/16 per weight, well under the delta itself.
    assert (merged_w - target).abs().mean() < 0.2 * layer.delta_weight("default").abs().mean()
    effect = (adapted - base).abs().mean()
    assert (logits(model, batch) - adapted).abs().mean() < 0.5 * effect
    unmerge_lora(model)
    assert (logits(model, batch) - adapted).abs().mean() < 0.5 * effect


def test_qlora_adapter_merges_exactly_into_full_precision_base(tiny_dir, batch, tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = load_model_and_tokenizer(str(tiny_dir), quantization="4bit")
    apply_lora(model, LoraConfig(r=4, lora_alpha=8))
    randomize_b(model)
    save_adapter(model, tmp_path / "qlora")
    full, _ = load_model_and_tokenizer(str(tiny_dir))
    load_adapter(full.eval(), tmp_path / "qlora")  # same fingerprint: quantization is not part of it
    expected = logits(full, batch)
    merge_and_save(str(tiny_dir), [tmp_path / "qlora"], tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert close(logits(plain, batch), expected, 1e-5)


def test_eval_pass_does_not_cut_4bit_gradients(tiny_dir, batch):
    """bitsandbytes repacks 4-bit weights for a backward-less CPU kernel on no-grad eval; minift prevents it."""
    model, _ = load_model_and_tokenizer(str(tiny_dir), quantization="4bit")
    model.eval()
    with torch.no_grad():
        model(batch, use_cache=False)  # an evaluation before LoRA is applied (e.g. a baseline score)
    apply_lora(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    first = model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    model.train()
    model(batch, labels=batch, use_cache=False).loss.backward()
    reference = first.grad.clone()
    first.grad = None
    model.eval()
    with torch.no_grad():
        model(batch, use_cache=False)  # an evaluation during training
    model.train()
    model(batch, labels=batch, use_cache=False).loss.backward()
    assert first.grad is not None and reference.abs().max() > 0
    assert torch.allclose(first.grad, reference, atol=1e-6)
