"""What a new user sees first: ``--help`` of every recipe and of the benchmarks, and no warnings from libraries
the run does not use."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"


@pytest.mark.parametrize("recipe,config", [("sft", "SFTConfig"), ("dpo", "DPOConfig"), ("kto", "KTOConfig"),
                                           ("sft_dpo", "ChainConfig"), ("grpo", "GRPOConfig"),
                                           ("reward_model", "RewardConfig"), ("distill", "DistillConfig"),
                                           ("cot_distill", "CoTConfig"), ("ppo", "PPOConfig"),
                                           ("rlaif", "RLAIFConfig")])
def test_every_recipe_option_has_a_help_text_and_one_default(recipe, config, monkeypatch, capsys):
    """Each flag of ``--help`` says what it is and states its default once, as a value (never "(computed)")."""
    from minift.config import parse_config

    monkeypatch.syspath_prepend(str(RECIPES))  # sft_dpo.py and the distillation recipes import their siblings
    cls = getattr(load_recipe(recipe), config)
    with pytest.raises(SystemExit) as exit_:
        parse_config(cls, ["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split("options:", 1)[1].split())  # unwrapped, after the usage
    for f in dataclasses.fields(cls):
        entry = re.search(rf"--{f.name} \S+ (.*?)(?= --\w|$)", text)
        assert entry, f.name
        help_text = entry.group(1)
        assert not help_text.startswith("(default"), (f.name, help_text)  # a description comes first
        assert help_text.count("default") == 1 and "(computed)" not in help_text, (f.name, help_text)
    if recipe != "sft_dpo":  # the chain has its own few options
        assert "--target_modules VALUE module names, comma-separated, or all-linear (default: all-linear)" in text


def test_bench_help_works():
    """``python tools/bench.py --help`` lists the cases (a ``%`` in a case's help text used to crash argparse)."""
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), "--help"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for case in ("lora", "data", "sft", "dpo", "gguf", "serve", "grpo", "distill", "ppo", "pipeline"):
        assert case in proc.stdout


def test_bitsandbytes_is_not_imported_without_quantization(tiny_dir):
    """LoRA on a full-precision model never imports bitsandbytes (its import prints kernel warnings on CPU)."""
    code = ("import sys; from minift.model.load import load_model_and_tokenizer; from minift.lora.config import "
            "LoraConfig; from minift.lora.layers import apply_lora; m, _ = load_model_and_tokenizer('tiny'); "
            "apply_lora(m, LoraConfig(r=4)); print('bitsandbytes' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "False", proc.stderr[-2000:]
    assert "gemm_4bit" not in proc.stderr


def test_a_full_precision_training_run_prints_no_bitsandbytes_warning(tiny_dir, tmp_path):
    """A whole SFT run (set-up, schedule, training, saving) with the test extras installed: transformers'
    schedule module imports peft, which imports bitsandbytes and its CPU kernel warning; minift's own
    schedules keep both out."""
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "Reverse the words: cat dog", "completion": "dog cat"}\n' * 8)
    proc = subprocess.run([sys.executable, str(ROOT / "recipes" / "sft.py"), "--dataset_name_or_path", str(data),
                           "--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--per_device_train_batch_size",
                           "2", "--validation_split", "0"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "gemm_4bit" not in proc.stderr and "bitsandbytes" not in proc.stderr, proc.stderr[-2000:]
    assert "sft done: 2 steps" in proc.stderr  # the final summary


def test_the_loss_plot_without_matplotlib_is_skipped_with_one_message(caplog, tmp_path, monkeypatch):
    """matplotlib is an extra (``.[plot]``): without it the plot is skipped, and said once per process, with
    how to get it."""
    import minift.train.outputs as outputs

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    monkeypatch.setattr(outputs, "_PLOT_SKIPPED", [])
    history = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}]
    with caplog.at_level("INFO", logger="minift.train.outputs"):
        assert outputs.plot_losses(history, tmp_path / "a.png") is None
        assert outputs.plot_losses(history, tmp_path / "b.png") is None
    skipped = [r.getMessage() for r in caplog.records if "loss plot skipped" in r.getMessage()]
    assert skipped == ["loss plot skipped: matplotlib is not installed (pip install matplotlib)"]
    assert not list(tmp_path.iterdir())
