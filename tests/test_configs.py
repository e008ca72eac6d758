"""Shipped example configs stay valid: recipe configs parse into their dataclass, Accelerate configs are well-formed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from minift.config import ConfigError, parse_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs"
sys.path.insert(0, str(ROOT / "recipes"))


def test_sft_example_config_parses(monkeypatch):
    from sft import SFTConfig

    monkeypatch.chdir(ROOT)
    cfg = parse_config(SFTConfig, ["--config", str(CONFIGS / "sft_lora.yaml"), "--learning_rate", "1e-4"])
    assert cfg.model_name_or_path == "Qwen/Qwen2.5-0.5B-Instruct" and cfg.learning_rate == 1e-4  # flags win
    assert cfg.target_modules == ["all-linear"] and cfg.lora_r == 16 and cfg.gradient_checkpointing is True


@pytest.mark.parametrize("name,kind", [("accelerate_ddp.yaml", "MULTI_GPU"), ("accelerate_fsdp.yaml", "FSDP"),
                                       ("accelerate_zero2.yaml", "DEEPSPEED"), ("accelerate_zero3.yaml", "DEEPSPEED")])
def test_accelerate_configs_are_well_formed(name, kind):
    text = (CONFIGS / name).read_text()
    assert text.startswith("# accelerate launch --config_file recipes/configs/" + name)
    config = yaml.safe_load(text)
    assert config["distributed_type"] == kind and config["num_processes"] >= 2


def test_unknown_yaml_key_names_file_line_and_suggestion(tmp_path):
    from sft import SFTConfig

    path = tmp_path / "bad.yaml"
    path.write_text("learning_rate: 1e-4\nlora_rank: 8\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:2: unknown key 'lora_rank'; did you mean 'lora_r'\?"):
        parse_config(SFTConfig, ["--config", str(path)])
    path.write_text("learning_rate: fast\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:1: learning_rate: expected a number, got 'fast'"):
        parse_config(SFTConfig, ["--config", str(path)])
