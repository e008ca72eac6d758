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
                                       ("accelerate_fsdp_cpu.yaml", "FSDP"),
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


def test_config_mistakes_that_used_to_pass_fail_before_anything_loads(tmp_path, monkeypatch):
    """A key given twice in YAML (YAML keeps the last one, silently), non-finite epochs, an output_dir that is a
    file or cannot be written, and max_seq_length 0: each is one ConfigError naming the setting (and the line)."""
    from conftest import load_recipe

    from minift.config import ConfigError, parse_config

    sft = load_recipe("sft")
    twice = tmp_path / "twice.yaml"
    twice.write_text("learning_rate: 1e-3\nmax_steps: 4\nlearning_rate: 2e-3\n")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    locked = tmp_path / "locked"
    locked.mkdir()
    cases = {
        "twice": (["--config", str(twice)], f"{twice}:3: key 'learning_rate' is given twice (first on line 1); keep one"),
        "inf epochs": (["--num_train_epochs", "inf"], "command line: num_train_epochs and learning_rate must be finite, "
                                                       "got inf, 0.004"),
        "file": (["--output_dir", str(a_file)], f"command line: output_dir {a_file} is a file, not a directory"),
        "seq 0": (["--max_seq_length", "0"], "command line: max_seq_length must be >= 2, got 0"),
    }
    import minift.sections

    # This machine's tests run as root, who may write anywhere: the permission answer is the operating system's.
    writable = minift.sections.os.access
    monkeypatch.setattr(minift.sections.os, "access", lambda path, mode: path != locked and writable(path, mode))
    cases["unwritable"] = (["--output_dir", str(locked / "out")],
                           f"command line: output_dir {locked / 'out'}: {locked} is not writable")
    for name, (args, message) in cases.items():
        with pytest.raises(ConfigError) as err:
            parse_config(sft.SFTConfig, args)
        assert str(err.value) == message, name


def test_real_model_defaults_replace_the_demo_values_unless_given(tmp_path, capsys):
    """No model given: the tiny demo's values. Any other model: the recipe's REAL_MODEL values, except those set by a
    flag or a YAML key; --help states both; a pipeline decides by its base model, not by a stage's start."""
    from conftest import load_recipe

    from minift.config import config_from_dict

    sft, dpo, grpo = load_recipe("sft"), load_recipe("dpo"), load_recipe("grpo")
    demo = parse_config(sft.SFTConfig, [])
    assert (demo.learning_rate, demo.lora_r, demo.num_train_epochs, demo.max_seq_length) == (4e-3, 32, 25.0, 128)
    assert demo.real_model_note() is None
    real = parse_config(sft.SFTConfig, ["--model_name_or_path", "org/model"])
    assert (real.learning_rate, real.lora_r, real.lora_alpha, real.num_train_epochs, real.max_seq_length,
            real.per_device_train_batch_size) == (2e-4, 16, 32.0, 3.0, 1024, 8)
    assert "learning_rate 0.0002 (demo: 0.004)" in real.real_model_note()
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("model_name_or_path: org/model\nlora_r: 64\n")
    given = parse_config(sft.SFTConfig, ["--config", str(yaml_file), "--learning_rate", "1e-3"])
    assert (given.learning_rate, given.lora_r, given.max_seq_length) == (1e-3, 64, 1024)
    assert "learning_rate" not in given.real_model_note() and "lora_r" not in given.real_model_note()
    assert (parse_config(dpo.DPOConfig, ["--model_name_or_path", "org/model"]).beta,
            parse_config(dpo.DPOConfig, []).beta) == (0.1, 1.0)
    rl = parse_config(grpo.GRPOConfig, ["--model_name_or_path", "org/model"])
    assert (rl.learning_rate, rl.max_completion_length, rl.per_device_train_batch_size) == (1e-5, 256, 64)
    # 64 full-length completions of a real model: without checkpointing, SmolLM2's step went past 24 GB
    assert rl.gradient_checkpointing and not parse_config(grpo.GRPOConfig, []).gradient_checkpointing
    stage = config_from_dict(dpo.DPOConfig, {"model_name_or_path": str(tmp_path)}, base_model="tiny")
    assert stage.learning_rate == 1e-3 and stage.beta == 1.0  # a tiny pipeline's merged start keeps the demo
    with pytest.raises(SystemExit):
        parse_config(sft.SFTConfig, ["--help"])
    assert "(default: 0.004 on the tiny demo model, 0.0002 on any other)" in " ".join(capsys.readouterr().out.split())


RECIPE_CONFIGS = {"sft": "SFTConfig", "dpo": "DPOConfig", "kto": "KTOConfig", "reward_model": "RewardConfig",
                  "grpo": "GRPOConfig", "ppo": "PPOConfig", "rlaif": "RLAIFConfig", "distill": "DistillConfig",
                  "cot_distill": "CoTConfig"}


def real_model_rows() -> list[str]:
    """The README's table of defaults, one row per recipe: each value the real-model settings change."""
    import dataclasses

    from conftest import load_recipe

    from minift.config import field_default

    rows = []
    for name, class_name in RECIPE_CONFIGS.items():
        cls = getattr(load_recipe(name), class_name)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        changes = [f"`{k}` {field_default(fields[k])} -> {v}" for k, v in cls.REAL_MODEL.items()
                   if k in fields and field_default(fields[k]) != v]
        rows.append(f"| {name} | {', '.join(changes)} |")
    return rows


def test_readme_lists_each_recipes_real_model_defaults():
    readme = (ROOT / "README.md").read_text()
    for row in real_model_rows():
        assert row in readme, row
