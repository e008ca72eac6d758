"""LoRA layers: identity at init, training touches only adapters, merge == unmerged, DoRA, targeting."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from minift.lora.config import LoraConfig
from minift.lora.layers import (
    LoraLayer,
    ModulesToSave,
    apply_lora,
    disable_adapters,
    lora_layers,
    set_trainable,
)
from minift.lora.merge import folded_adapters, merge_lora, unmerge_lora, unwrap_lora

LLAMA_LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    """Max abs difference within ``tol`` times the logits' scale (float32 rounding grows with magnitude)."""
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


def randomize_b(model, name=None):
    """Give LoRA B (all adapters', or adapter ``name``'s) non-zero values so that adapters change the output."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for key, b in layer.lora_B.items():
                if name in (None, key):
                    b.weight.copy_(torch.randn(b.weight.shape, generator=g) * 0.05)
            for key, m in layer.lora_magnitude_vector.items():
                if name in (None, key):
                    m.mul_(1 + 0.1 * torch.randn(m.shape, generator=g))


@pytest.mark.parametrize("kwargs", [{}, {"use_dora": True}, {"use_rslora": True}, {"init_lora_weights": "gaussian"}])
def test_zero_init_leaves_outputs_unchanged(llama, batch, kwargs):
    before = logits(llama, batch)
    apply_lora(llama, LoraConfig(r=4, lora_alpha=8, **kwargs))
    assert len(list(lora_layers(llama))) == 14
    assert close(logits(llama, batch), before, 1e-6)


def test_zero_init_conv1d(gpt2, batch):
    before = logits(gpt2, batch)
    apply_lora(gpt2, LoraConfig(r=4, target_modules=["c_attn", "c_proj", "c_fc"]))
    kinds = {layer.kind for _, layer in lora_layers(gpt2)}
    assert kinds == {"conv1d"}
    assert close(logits(gpt2, batch), before, 1e-6)


def test_training_changes_only_adapter_and_saved_modules(llama, batch):
    base_state = {k: v.clone() for k, v in llama.state_dict().items()}
    apply_lora(llama, LoraConfig(r=4, lora_alpha=8, modules_to_save=["lm_head"]))
    llama.train()
    params = [p for p in llama.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        loss = llama(batch, labels=batch, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    changed, unchanged = set(), set()
    for name, value in llama.state_dict().items():
        plain = name.replace(".base_layer", "").replace(".original_module", "")
        if plain in base_state and ".modules_to_save." not in name:
            assert torch.equal(value, base_state[plain]), f"frozen weight {name} changed"
            unchanged.add(plain)
        else:
            changed.add(name)
    assert unchanged == set(base_state)  # every base weight is still there, bit-identical
    trainable = {n for n, p in llama.named_parameters() if p.requires_grad}
    assert trainable == {n for n in changed}
    assert any("lora_B" in n for n in trainable) and "lm_head.modules_to_save.default.weight" in trainable
    for name, p in llama.named_parameters():
        if "lora_B" in name:
            assert p.abs().sum() > 0, f"{name} did not move"
    head = llama.lm_head
    assert not torch.equal(head.modules_to_save["default"].weight, head.original_module.weight)


MERGE_CASES = {
    "linear": dict(r=4, lora_alpha=8),
    "dora": dict(r=4, lora_alpha=8, use_dora=True),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True),
    "patterns": dict(r=4, lora_alpha=8, rank_pattern={"q_proj": 2, r"layers\.1\.mlp\.up_proj": 6},
                     alpha_pattern={"v_proj": 3.0}),
}


@pytest.mark.parametrize("case", sorted(MERGE_CASES))
def test_merge_equals_unmerged_llama(llama, batch, case):
    base = logits(llama, batch)
    apply_lora(llama, LoraConfig(**MERGE_CASES[case]))
    randomize_b(llama)
    adapted = logits(llama, batch)
    assert (adapted - base).abs().max() > 1e-2  # the adapter is visible
    merge_lora(llama)
    assert close(logits(llama, batch), adapted, 1e-5)
    unmerge_lora(llama)
    assert close(logits(llama, batch), adapted, 1e-5)
    with disable_adapters(llama):
        assert close(logits(llama, batch), base, 1e-5)


@pytest.mark.parametrize("dora", [False, True])
def test_merge_equals_unmerged_conv1d(gpt2, batch, dora):
    apply_lora(gpt2, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=dora))
    randomize_b(gpt2)
    adapted = logits(gpt2, batch)
    merge_lora(gpt2)
    assert close(logits(gpt2, batch), adapted, 1e-5)


def test_patterns_set_rank_and_scale(llama):
    apply_lora(llama, LoraConfig(**MERGE_CASES["patterns"]))
    layers = dict(lora_layers(llama))
    q = layers["model.layers.0.self_attn.q_proj"]
    assert q.lora_A["default"].weight.shape == (2, 64) and q.scaling["default"] == 8 / 2
    up1, up0 = layers["model.layers.1.mlp.up_proj"], layers["model.layers.0.mlp.up_proj"]
    assert up1.r["default"] == 6 and up0.r["default"] == 4
    v = layers["model.layers.1.self_attn.v_proj"]
    assert v.scaling["default"] == 3.0 / 4
    apply_lora(llama, LoraConfig(r=16, lora_alpha=8, use_rslora=True, target_modules=["o_proj"]), "rs")
    assert layers["model.layers.0.self_attn.o_proj"].scaling["rs"] == 8 / math.sqrt(16)


def test_dora_matches_formula_and_detached_norm(llama):
    """DoRA layer output and gradients equal W' = m (W + sBA) / ||W + sBA||_row with the norm detached."""
    apply_lora(llama, LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["model.layers.0.mlp.up_proj"]))
    randomize_b(llama)
    layer = llama.model.layers[0].mlp.up_proj
    x = torch.randn(3, 64)
    out = layer(x)
    out.pow(2).sum().backward()
    ours = {n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad}

    A = layer.lora_A["default"].weight.detach().clone().requires_grad_(True)
    B = layer.lora_B["default"].weight.detach().clone().requires_grad_(True)
    m = layer.lora_magnitude_vector["default"].detach().clone().requires_grad_(True)
    W = layer.base_layer.weight.detach()
    V = W + 2.0 * B @ A
    W_prime = m[:, None] * V / V.norm(dim=1, keepdim=True).detach()
    expected = x @ W_prime.T
    expected.pow(2).sum().backward()
    assert close(out, expected, 1e-5)
    assert torch.allclose(ours["lora_A.default.weight"], A.grad, atol=1e-5)
    assert torch.allclose(ours["lora_B.default.weight"], B.grad, atol=1e-5)
    assert torch.allclose(ours["lora_magnitude_vector.default"], m.grad, atol=1e-5)


def test_targets_by_name_suffix_regex_and_all_linear(llama):
    import copy

    def wrapped(cfg):
        m = copy.deepcopy(llama)
        apply_lora(m, cfg)
        return sorted(n for n, _ in lora_layers(m))

    all_linear = wrapped(LoraConfig(target_modules="all-linear"))
    assert len(all_linear) == 14 and "lm_head" not in all_linear
    assert {n.rsplit(".", 1)[1] for n in all_linear} == LLAMA_LINEARS
    assert wrapped(LoraConfig(target_modules=["q_proj", "v_proj"])) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert wrapped(LoraConfig(target_modules=r".*layers\.1\..*_proj")) == sorted(n for n in all_linear if ".1." in n)
    assert wrapped(LoraConfig(target_modules=["model.layers.0.mlp.up_proj"])) == ["model.layers.0.mlp.up_proj"]
    assert wrapped(LoraConfig(target_modules=["lm_head"])) == ["lm_head"]  # explicit names may target the head
    excluded = wrapped(LoraConfig(target_modules="all-linear", exclude_modules=["down_proj", "model.layers.0.self_attn.q_proj"]))
    assert len(excluded) == 14 - 2 - 1 and "model.layers.1.self_attn.q_proj" in excluded


def test_unknown_target_lists_existing_modules(llama):
    with pytest.raises(ValueError) as err:
        apply_lora(llama, LoraConfig(target_modules=["query_key_value"]))
    msg = str(err.value)
    assert "query_key_value" in msg and "q_proj" in msg and "down_proj" in msg and "lm_head" in msg


@pytest.mark.parametrize("bad", [dict(r=0), dict(lora_alpha=-1), dict(lora_dropout=1.5), dict(target_modules=[]),
                                 dict(rank_pattern={"q_proj": 0}), dict(init_lora_weights="pissa")])
def test_bad_config_values(bad):
    with pytest.raises(ValueError):
        LoraConfig(**bad)


def test_logs_trainable_params(llama, caplog):
    with caplog.at_level(logging.INFO, logger="minift.lora.layers"):
        apply_lora(llama, LoraConfig(r=2, target_modules=["q_proj"]))
    # 2 layers x (A: 2x64 + B: 64x2) = 512 trainable
    total = sum(p.numel() for p in llama.parameters())
    assert f"trainable params: 512 / {total:,}" in caplog.text


def test_two_named_adapters_frozen_plus_trainable(llama, batch):
    base = logits(llama, batch)
    apply_lora(llama, LoraConfig(r=4, lora_alpha=8, modules_to_save=["lm_head"]), "sft")
    randomize_b(llama)
    with torch.no_grad():
        llama.lm_head.modules_to_save["sft"].weight.mul_(1.5)
    after_sft = logits(llama, batch)
    apply_lora(llama, LoraConfig(r=2, lora_alpha=4, modules_to_save=["lm_head"]), "dpo")
    assert len(list(lora_layers(llama))) == 14  # the second adapter joins the same layers; A/B are never wrapped
    assert close(logits(llama, batch), after_sft, 1e-6)  # the new adapter starts as identity
    # The dpo copy of lm_head starts from the sft copy, not the original.
    assert torch.equal(llama.lm_head.modules_to_save["dpo"].weight, llama.lm_head.modules_to_save["sft"].weight)
    trainable = {n for n, p in llama.named_parameters() if p.requires_grad}
    assert trainable and all(".dpo" in n for n in trainable)
    llama.train()
    llama(batch, labels=batch, use_cache=False).loss.backward()
    for n, p in llama.named_parameters():
        assert (p.grad is not None) == (".dpo" in n), n
    with torch.no_grad():
        for _, layer in lora_layers(llama):
            layer.lora_B["dpo"].weight.fill_(0.01)
        llama.lm_head.modules_to_save["dpo"].weight.mul_(0.9)
    llama.eval()
    both = logits(llama, batch)
    with disable_adapters(llama, ["dpo"]):  # the reference model of a DPO stage: base + sft
        assert close(logits(llama, batch), after_sft, 1e-6)
    with disable_adapters(llama):
        assert close(logits(llama, batch), base, 1e-6)
    assert close(logits(llama, batch), both, 1e-6)
    set_trainable(llama, ["sft", "dpo"])
    assert any(".sft" in n for n, p in llama.named_parameters() if p.requires_grad)


def test_disable_merged_adapter_is_an_error(llama):
    apply_lora(llama, LoraConfig(r=2))
    merge_lora(llama)
    with pytest.raises(RuntimeError, match="unmerge"):
        with disable_adapters(llama):
            pass


@pytest.mark.parametrize("case", ["linear", "dora", "conv1d", "bf16"])
def test_folded_adapters_compute_the_adapted_model_and_give_the_weights_back_untouched(llama, gpt2, batch, case):
    """The sampler's fold: inside the block the LoRA wrappers are gone and each base layer runs with the enabled
    adapters folded into a copy of its weight, giving the adapted outputs; afterwards the wrappers and the very same
    base tensors are back, bit for bit (an in-place merge + unmerge would round a bf16 base), and the adapters run
    unfolded again. A disabled adapter stays out of the fold."""
    model = gpt2 if case == "conv1d" else llama.to(torch.bfloat16) if case == "bf16" else llama
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=case == "dora"))
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), adapter_name="off")
    randomize_b(model)
    with disable_adapters(model):
        plain = logits(model, batch).float()
    with disable_adapters(model, ["off"]):
        adapted = logits(model, batch)
        assert not close(plain, adapted.float(), 0.1)  # the adapter is visible
        bases = {name: layer.base_layer.weight.data for name, layer in lora_layers(model)}
        snapshot = {name: w.clone() for name, w in bases.items()}
        layers = dict(lora_layers(model))
        with folded_adapters(model):
            assert not any(isinstance(m, LoraLayer) for m in model.modules())
            assert all(model.get_submodule(name) is layer.base_layer and
                       layer.base_layer.weight.data_ptr() != bases[name].data_ptr() for name, layer in layers.items())
            assert close(logits(model, batch).float(), adapted.float(), 3e-2 if case == "bf16" else 1e-5)
        assert dict(lora_layers(model)) == layers
        for name, layer in layers.items():
            assert layer.base_layer.weight.data.data_ptr() == bases[name].data_ptr() and not layer.merged
            assert torch.equal(layer.base_layer.weight.data, snapshot[name])
        assert torch.equal(logits(model, batch), adapted)


def test_unwrap_gives_plain_modules(llama, batch):
    apply_lora(llama, LoraConfig(r=4, modules_to_save=["lm_head"]))
    randomize_b(llama)
    adapted = logits(llama, batch)
    merge_lora(llama)
    unwrap_lora(llama)
    assert not any(isinstance(m, (LoraLayer, ModulesToSave)) for m in llama.modules())
    assert close(logits(llama, batch), adapted, 1e-5)


def test_dropout_only_in_training(llama, batch):
    apply_lora(llama, LoraConfig(r=4, lora_dropout=0.5))
    randomize_b(llama)
    a, b = logits(llama, batch), logits(llama, batch)
    assert torch.equal(a, b)
    llama.train()
    torch.manual_seed(0)
    c = logits(llama, batch)
    assert (c - a).abs().max() > 1e-4
