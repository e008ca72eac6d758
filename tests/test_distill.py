"""recipes/distill.py and the vocabulary check: the student learns the SFT demo's teacher (KL halved, exact match
up); a padded teacher embedding is sliced, another vocabulary refused; the top-k file equals the dense teacher when
k covers the vocabulary and serves alone; on-policy batches are reproducible and lmbda 0 is the offline run;
sequence-level KD generates once; bad input fails with one clear error."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import RECIPES, _ProcessState, assert_same_adapter, load_recipe

from minift.model.vocab import VocabularyError, shared_vocabulary

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "data" / "demo_sft.jsonl"


@pytest.fixture(scope="module")
def distill(monkeypatch_session):
    monkeypatch_session.syspath_prepend(str(RECIPES))  # distill.py builds on sft.py
    return load_recipe("distill")


@pytest.fixture(scope="module")
def teachers(demo_chain, tiny_dir, tmp_path_factory):
    """The SFT demo adapter merged into tiny (the teacher, 95% exact match), and the same model with its embedding
    and head padded by 64 random rows past the tokenizer (as checkpoints of one family differ)."""
    from transformers import AutoModelForCausalLM

    from minift.lora.merge import merge_and_save

    out = tmp_path_factory.mktemp("teachers")
    merged = merge_and_save(str(tiny_dir), [demo_chain[0] / "sft" / "adapter"], out / "merged")
    model = AutoModelForCausalLM.from_pretrained(merged)
    rows = model.get_input_embeddings().num_embeddings
    torch.manual_seed(0)
    model.resize_token_embeddings(rows + 64, mean_resizing=False)
    with torch.no_grad():
        model.get_output_embeddings().weight[rows:].normal_(0, 1.0)
    model.save_pretrained(out / "padded")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(merged) / name, out / "padded" / name)
    return Path(merged), out / "padded", rows


@pytest.fixture(scope="module")
def data64(tmp_path_factory):
    path = tmp_path_factory.mktemp("distill-data") / "train.jsonl"
    path.write_text("".join(DEMO.read_text().splitlines(keepends=True)[:64]))
    return path


def short(distill, data64, out: Path, **options):
    """A 3-step run on 64 demo records (no held-out split, no generation eval)."""
    fields = dict(dataset_name_or_path=str(data64), validation_split=0.0, answer_eval_dataset=None, max_steps=3,
                  per_device_train_batch_size=4, logging_steps=1, lora_r=8, lora_alpha=16, output_dir=str(out))
    with _ProcessState():
        return distill.main(distill.DistillConfig(**{**fields, **options}))


def test_vocabulary_check_slices_padding_and_refuses_other_tokens(teachers, tiny_dir, tmp_path):
    from minift.model.load import build_tiny_model

    merged, padded, rows = teachers
    assert shared_vocabulary(str(tiny_dir), str(padded)) == rows  # 64 padded rows: sliced, not refused
    config_only = tmp_path / "config-only"  # no weights file: the check reads configs and tokenizers only
    config_only.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(padded / name, config_only / name)
    assert shared_vocabulary(str(tiny_dir), str(config_only)) == rows
    other = tmp_path / "other"
    build_tiny_model(other, corpus="Completely different words make another byte-level vocabulary.\n" * 40)
    with pytest.raises(VocabularyError) as err:
        shared_vocabulary(str(tiny_dir), str(other))
    from transformers import AutoTokenizer

    ours, theirs = AutoTokenizer.from_pretrained(tiny_dir), AutoTokenizer.from_pretrained(other)
    first = next(i for i in range(min(len(ours), len(theirs)))
                 if ours.convert_ids_to_tokens(i) != theirs.convert_ids_to_tokens(i))
    message = str(err.value)
    assert f"{len(theirs):,} tokens" in message and f"against {len(ours):,}" in message
    assert f"first differ at id {first}: student {ours.convert_ids_to_tokens(first)!r}, teacher " \
           f"{theirs.convert_ids_to_tokens(first)!r}" in message


@pytest.mark.slow
def test_distilling_the_sft_teacher_halves_the_kl_and_teaches_the_task(distill, demo_chain, tmp_path):
    """The recipe's defaults, a fresh student and the SFT demo adapter as the teacher: held-out KL(teacher ||
    student) at most half of what it was, greedy exact match up by >= 30 points."""
    with _ProcessState():
        result = distill.main(distill.DistillConfig(teacher_model_name_or_path="tiny", output_dir=str(tmp_path),
                                                    teacher_adapter=[str(demo_chain[0] / "sft" / "adapter")]))
    assert result["teacher_answer_accuracy"] >= 0.9, result
    assert result["eval_kl"] <= 0.5 * result["eval_kl_before"], result
    assert result["answer_accuracy"] >= result["answer_accuracy_before"] + 0.30, result


def test_a_padded_teacher_is_sliced_to_the_shared_rows(distill, teachers, data64, tmp_path):
    """64 random rows past the tokenizer change nothing: the same adapter as with the unpadded teacher."""
    merged, padded, _ = teachers
    short(distill, data64, tmp_path / "plain", teacher_model_name_or_path=str(merged))
    short(distill, data64, tmp_path / "padded", teacher_model_name_or_path=str(padded))
    assert_same_adapter(tmp_path / "plain" / "adapter", tmp_path / "padded" / "adapter", atol=1e-6)


def test_top_k_file_equals_the_dense_teacher_and_serves_alone(distill, teachers, data64, tmp_path):
    merged, _, rows = teachers
    short(distill, data64, tmp_path / "dense", teacher_model_name_or_path=str(merged))
    cache = tmp_path / "top.safetensors"
    short(distill, data64, tmp_path / "written", teacher_model_name_or_path=str(merged), teacher_cache=str(cache),
          teacher_top_k=rows)  # k = the vocabulary: the tail bucket is empty, the loss is the dense one
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
               if '"loss"' in line] for run in ("dense", "written")]
    # The same weights at the first step: the sums over the vocabulary run in another order (top-k order, not id
    # order), which moves the loss by float32 rounding: 3e-6 relative on an AVX2 CPU (AMD EPYC), under 1e-6 on AVX-512.
    assert len(losses[0]) == 3 and losses[0][0] == pytest.approx(losses[1][0], rel=1e-5)
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)  # then float32 rounding, amplified by Adam
    # Adam's first steps move near-zero-gradient elements a full step either way: deltas agree to 1e-4, not 1e-6
    assert_same_adapter(tmp_path / "dense" / "adapter", tmp_path / "written" / "adapter", atol=1e-4)
    from safetensors import safe_open

    with safe_open(str(cache), "pt") as f:
        assert f.get_slice("train.ids").get_shape()[1] == rows and json.loads(f.metadata()["key"])["k"] == rows
    short(distill, data64, tmp_path / "read", teacher_cache=str(cache), teacher_top_k=rows)  # no teacher model
    assert_same_adapter(tmp_path / "written" / "adapter", tmp_path / "read" / "adapter", atol=0)
    from minift.config import ConfigError

    with pytest.raises(ConfigError, match="was computed for other data, another teacher or another k"):
        short(distill, data64, tmp_path / "stale", teacher_cache=str(cache), teacher_top_k=20)


def test_on_policy_batches_are_reproducible_and_lmbda_0_is_offline(distill, teachers, data64, tmp_path):
    merged, _, _ = teachers
    teacher = dict(teacher_model_name_or_path=str(merged))
    short(distill, data64, tmp_path / "offline", packing=False, **teacher)
    short(distill, data64, tmp_path / "lmbda0", mode="on_policy", lmbda=0.0, **teacher)
    assert_same_adapter(tmp_path / "offline" / "adapter", tmp_path / "lmbda0" / "adapter", atol=1e-6)
    for run in ("a", "b"):
        short(distill, data64, tmp_path / run, mode="on_policy", lmbda=0.5, max_completion_length=8, **teacher)
    assert_same_adapter(tmp_path / "a" / "adapter", tmp_path / "b" / "adapter", atol=0)
    shares = [json.loads(line)["sampled_share"] for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
              if "sampled_share" in line]
    assert len(shares) == 3 and 0 < sum(shares) / 3 < 1, shares


def test_sequence_kd_generates_once(distill, teachers, data64, tmp_path, monkeypatch, capsys):
    merged, _, _ = teachers
    import minift.train.teacher as teacher_module

    calls = []
    real = teacher_module.sample_chunks
    monkeypatch.setattr(teacher_module, "sample_chunks", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    options = dict(teacher_model_name_or_path=str(merged), mode="sequence", max_completion_length=12)
    short(distill, data64, tmp_path, **options)
    lines = (tmp_path / "teacher_generations.jsonl").read_text().splitlines()
    assert sum(calls) == len(lines) == 64
    assert "teacher completions: 100%" in capsys.readouterr().err
    short(distill, data64, tmp_path, overwrite_output_dir=True, **options)
    assert sum(calls) == 64  # the rerun read every generation from the file
    assert "teacher completions" not in capsys.readouterr().err


def test_bad_input_fails_before_training_with_one_clear_error(teachers, tiny_dir, tmp_path):
    from minift.model.load import build_tiny_model

    other = tmp_path / "other"
    build_tiny_model(other, corpus="Completely different words make another byte-level vocabulary.\n" * 40)
    text = tmp_path / "text.jsonl"
    text.write_text('{"text": "red cup blue"}\n' * 8)
    merged = str(teachers[0])
    cases = [([], "give the teacher"),
             (["--teacher_model_name_or_path", other], "has another vocabulary than the student"),
             (["--teacher_model_name_or_path", merged, "--mode", "on_policy", "--dataset_name_or_path", text,
               "--train_on", "all"], "on_policy and sequence modes need prompts"),
             (["--teacher_model_name_or_path", merged, "--mode", "sequence", "--teacher_cache", tmp_path / "c"],
              "teacher_cache serves the offline mode only"),
             (["--teacher_cache", tmp_path / "missing.safetensors"], "does not exist; give --teacher_model_name_or_path")]
    for args, message in cases:
        proc = subprocess.run([sys.executable, str(RECIPES / "distill.py"), *map(str, args), "--output_dir",
                               str(tmp_path / "out"), "--max_steps", "1"], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr, \
            (args, proc.stderr[-2000:])
