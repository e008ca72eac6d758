"""Adapter files: exact PEFT layout, round trips, combining chains, merging, and loud failures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_lora import close, logits, randomize_b
from transformers import AutoModelForCausalLM

from minift.lora.adapters import load_adapter, save_adapter
from minift.lora.config import LoraConfig
from minift.lora.layers import apply_lora, lora_layers, saved_modules
from minift.lora.merge import combine_adapters, merge_and_save
from minift.model.load import load_model_and_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def trained_adapter(model, cfg, name="default"):
    apply_lora(model, cfg, name)
    randomize_b(model, name)
    for _, wrapper in saved_modules(model):
        if name in wrapper.modules_to_save:
            with torch.no_grad():
                wrapper.modules_to_save[name].weight.mul_(1.1)
    return model


def test_saved_files_follow_peft_layout(llama, tmp_path):
    trained_adapter(llama, LoraConfig(r=4, lora_alpha=8, use_dora=True, modules_to_save=["lm_head"],
                                      rank_pattern={"q_proj": 2}))
    out = save_adapter(llama, tmp_path / "a", base_model_name_or_path="tiny", stage="sft")
    config = json.loads((out / "adapter_config.json").read_text())
    for key in ("peft_type", "task_type", "base_model_name_or_path", "r", "lora_alpha", "lora_dropout", "bias",
                "fan_in_fan_out", "target_modules", "use_rslora", "use_dora", "modules_to_save", "rank_pattern",
                "alpha_pattern", "init_lora_weights", "inference_mode"):
        assert key in config, key
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["r"] == 4
    assert config["minift"]["stage"] == "sft" and len(config["minift"]["base_fingerprint"]) == 16
    assert len(config["target_modules"]) == 14
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    p = "base_model.model.model.layers.0."
    assert shapes[p + "self_attn.q_proj.lora_A.weight"] == (2, 64)
    assert shapes[p + "self_attn.k_proj.lora_A.weight"] == (4, 64)
    assert shapes[p + "self_attn.k_proj.lora_B.weight"] == (32, 4)
    assert shapes[p + "mlp.up_proj.lora_magnitude_vector"] == (128,)
    assert shapes["base_model.model.lm_head.weight"] == (874, 64)
    assert len(shapes) == 14 * 3 + 1
    assert not list(tmp_path.glob(".*"))  # no temp dirs left behind


def test_round_trip_identical_logits(tiny_dir, batch, tmp_path):
    model, _ = load_model_and_tokenizer(str(tiny_dir))
    trained_adapter(model, LoraConfig(r=4, lora_alpha=8, use_dora=True, modules_to_save=["lm_head"],
                                      alpha_pattern={"o_proj": 2.0}))
    expected = logits(model.eval(), batch)
    save_adapter(model, tmp_path / "a")
    fresh, _ = load_model_and_tokenizer(str(tiny_dir))
    cfg = load_adapter(fresh.eval(), tmp_path / "a")
    assert cfg.use_dora and cfg.alpha_for("model.layers.0.self_attn.o_proj") == 2.0
    assert torch.equal(logits(fresh, batch), expected)
    assert not any(p.requires_grad for p in fresh.parameters())  # loaded adapters are frozen by default
    resumed, _ = load_model_and_tokenizer(str(tiny_dir))
    load_adapter(resumed, tmp_path / "a", trainable=True)
    assert {n for n, p in resumed.named_parameters() if p.requires_grad} >= {
        "model.layers.0.self_attn.q_proj.lora_A.default.weight", "lm_head.modules_to_save.default.weight"}


def test_save_overwrites_atomically(llama, tmp_path):
    trained_adapter(llama, LoraConfig(r=2))
    save_adapter(llama, tmp_path / "a")
    with torch.no_grad():
        for _, layer in lora_layers(llama):
            layer.lora_B["default"].weight.add_(1.0)
    save_adapter(llama, tmp_path / "a")
    saved = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    assert torch.equal(saved[key], llama.model.layers[0].self_attn.q_proj.lora_B["default"].weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_combine_equals_chain(tiny_dir, batch, tmp_path):
    model, _ = load_model_and_tokenizer(str(tiny_dir))
    trained_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                      modules_to_save=["lm_head"]), "sft")
    save_adapter(model, tmp_path / "sft", adapter_name="sft")
    trained_adapter(model, LoraConfig(r=2, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "o_proj"],
                                      modules_to_save=["lm_head"]), "dpo")
    save_adapter(model, tmp_path / "dpo", adapter_name="dpo")
    chain = logits(model.eval(), batch)
    out = combine_adapters([tmp_path / "sft", tmp_path / "dpo"], tmp_path / "final")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 6 and config["minift"]["parents"] == [str(tmp_path / "sft"), str(tmp_path / "dpo")]
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert weights["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (6, 64)
    assert weights["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"].shape == (4, 64)
    assert weights["base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight"].shape == (2, 64)
    fresh, _ = load_model_and_tokenizer(str(tiny_dir))
    load_adapter(fresh.eval(), out)
    assert close(logits(fresh, batch), chain, 1e-5)


def test_merged_model_loads_with_plain_transformers(tiny_dir, batch, tmp_path):
    model, _ = load_model_and_tokenizer(str(tiny_dir))
    trained_adapter(model, LoraConfig(r=4, lora_alpha=8, use_dora=True, modules_to_save=["lm_head"]), "sft")
    save_adapter(model, tmp_path / "sft", adapter_name="sft")
    trained_adapter(model, LoraConfig(r=2, target_modules=["q_proj"]), "dpo")
    save_adapter(model, tmp_path / "dpo", adapter_name="dpo")
    expected = logits(model.eval(), batch)
    merge_and_save(str(tiny_dir), [tmp_path / "sft", tmp_path / "dpo"], tmp_path / "merged", max_shard_size="200KB")
    assert len(list((tmp_path / "merged").glob("model-*.safetensors"))) > 1  # sharded
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert type(plain).__name__ == "LlamaForCausalLM"
    assert close(logits(plain, batch), expected, 1e-5)


def test_merge_adapter_cli(tiny_dir, batch, tmp_path):
    model, _ = load_model_and_tokenizer(str(tiny_dir))
    trained_adapter(model, LoraConfig(r=4))
    save_adapter(model, tmp_path / "a")
    expected = logits(model.eval(), batch)
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "merge_adapter.py"), str(tiny_dir),
                             str(tmp_path / "a"), "-o", str(tmp_path / "m")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    assert close(logits(plain, batch), expected, 1e-5)
    bad = subprocess.run([sys.executable, str(ROOT / "tools" / "merge_adapter.py"), str(tiny_dir),
                          str(tmp_path / "nope"), "-o", str(tmp_path / "m2")], capture_output=True, text=True)
    assert bad.returncode != 0 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def saved(llama, tmp_path):
    trained_adapter(llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    return save_adapter(llama, tmp_path / "a")


def test_wrong_base_is_refused(saved, gpt2_dir, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=874, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match="different base model"):
        load_adapter(other, saved)
    gpt2, _ = load_model_and_tokenizer(str(gpt2_dir))
    with pytest.raises(ValueError, match="different base"):
        load_adapter(gpt2, saved)
    with pytest.raises(ValueError, match="match no module"):  # even without the fingerprint
        load_adapter(gpt2, saved, check_base=False)


def test_shape_mismatch_is_refused(saved, tiny_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = LlamaForCausalLM(LlamaConfig(vocab_size=874, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match="shape mismatch.*q_proj.*different base"):
        load_adapter(wider, saved, check_base=False)


def test_wrong_rank_is_refused(saved, tiny_dir):
    cfg = json.loads((saved / "adapter_config.json").read_text())
    cfg["r"] = 8
    (saved / "adapter_config.json").write_text(json.dumps(cfg))
    model, _ = load_model_and_tokenizer(str(tiny_dir))
    with pytest.raises(ValueError, match=r"wrong rank for model\.layers\.\d\.self_attn\.[qv]_proj: the config gives r=8"):
        load_adapter(model, saved)


def test_unknown_module_key_is_refused(saved, tiny_dir):
    weights = load_file(str(saved / "adapter_model.safetensors"))
    weights["base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight"] = torch.zeros(4, 64)
    weights["base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight"] = torch.zeros(64, 4)
    save_file(weights, str(saved / "adapter_model.safetensors"), metadata={"format": "pt"})
    model, _ = load_model_and_tokenizer(str(tiny_dir))
    with pytest.raises(ValueError, match="qkv_proj"):
        load_adapter(model, saved)


def test_wrong_prefix_is_refused(saved, tiny_dir):
    weights = load_file(str(saved / "adapter_model.safetensors"))
    weights = {k.replace("base_model.model.", ""): v for k, v in weights.items()}
    save_file(weights, str(saved / "adapter_model.safetensors"))
    model, _ = load_model_and_tokenizer(str(tiny_dir))
    with pytest.raises(ValueError, match="does not start with 'base_model.model.'"):
        load_adapter(model, saved)


def test_incomplete_file_is_refused(saved, tiny_dir):
    weights = load_file(str(saved / "adapter_model.safetensors"))
    weights = {k: v for k, v in weights.items() if "layers.1.self_attn.v_proj" not in k}
    save_file(weights, str(saved / "adapter_model.safetensors"))
    model, _ = load_model_and_tokenizer(str(tiny_dir))
    with pytest.raises(ValueError, match=r"no weights in the file, e\.g\. model\.layers\.1\.self_attn\.v_proj"):
        load_adapter(model, saved)


def test_corrupt_safetensors_is_refused(saved, tiny_dir):
    path = saved / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    model, _ = load_model_and_tokenizer(str(tiny_dir))
    with pytest.raises(ValueError,
                       match=r"adapter_model\.safetensors is truncated: its tensors need [0-9,]+ bytes of data"):
        load_adapter(model, saved)


@pytest.mark.parametrize("edit,message", [
    (lambda c: [c], r"adapter_config\.json: expected a JSON object \(an adapter config\), got a JSON list"),
    (lambda c: {**c, "r": "abc"}, r"adapter_config\.json: field 'r' must be a positive integer, got 'abc'"),
    (lambda c: {**c, "r": 4.5}, r"field 'r' must be a positive integer, got 4\.5"),
    (lambda c: {**c, "lora_alpha": "x"}, r"field 'lora_alpha' must be a positive number, got 'x'"),
    (lambda c: {**c, "lora_dropout": 2}, r"field 'lora_dropout' must be a number in \[0, 1\), got 2"),
    (lambda c: {**c, "use_dora": "yes"}, r"field 'use_dora' must be true or false, got 'yes'"),
    (lambda c: {**c, "rank_pattern": ["q_proj"]}, r"field 'rank_pattern' must be an object mapping"),
    (lambda c: {**c, "rank_pattern": {"q_proj": -2}}, r"field 'rank_pattern' must be an object mapping"),
    (lambda c: {**c, "modules_to_save": "lm_head"}, r"field 'modules_to_save' must be a list of module names"),
    (lambda c: {k: v for k, v in c.items() if k != "r"}, r"required field 'r' is missing"),
])
def test_a_malformed_adapter_config_names_the_file_and_field(saved, tiny_dir, edit, message):
    path = saved / "adapter_config.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    model, _ = load_model_and_tokenizer(str(tiny_dir))
    with pytest.raises(ValueError, match=message) as err:
        load_adapter(model, saved)
    assert str(err.value).startswith(f"{path}: "), err.value


def test_missing_files_and_bad_json(saved, tiny_dir, tmp_path):
    model, _ = load_model_and_tokenizer(str(tiny_dir))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapter(model, tmp_path / "nowhere")
    (saved / "adapter_config.json").write_text('{"r": 4,\n "lora_alpha": }')
    with pytest.raises(ValueError, match="adapter_config.json, line 2: invalid JSON"):
        load_adapter(model, saved)
    (saved / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        load_adapter(model, saved)
