"""Hostile and broken inputs end with one clear `error:` line (no traceback, no hang), and what minift writes has the
usual permissions. Each case is a class of input a user meets: YAML with aliases that expand without end, weight
files that are Git LFS pointers, cut short or lie about their size, a converter told to write over its input, a
chat template that does not parse, data whose answers are all empty."""

from __future__ import annotations

import json
import os
import runpy
import shutil
import struct
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import ROOT, _ProcessState

BOMB = "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9 if p else ['lol'] * 9)}]\n"
               for p, c in zip([None, *"abcdefgh"], "abcdefghi"))


def run_main(script: str, *args, monkeypatch) -> str:
    """``python SCRIPT ARGS`` as ``__main__`` in this process: the message it exits with ('' for success)."""
    with monkeypatch.context() as mp, _ProcessState():
        mp.setattr(sys, "argv", [str(ROOT / script), *map(str, args)])
        mp.syspath_prepend(str(ROOT / Path(script).parent))
        try:
            runpy.run_path(str(ROOT / script), run_name="__main__")
        except SystemExit as exit_:
            return "" if exit_.code in (0, None) else str(exit_.code)
    return ""


def test_yaml_alias_bombs_and_cycles_are_refused_at_once(tmp_path, monkeypatch):
    """A billion-laughs YAML (9 levels of 9 aliases) as a recipe config or a pipeline file is refused in well under a
    second; so is an alias inside the value it names. Anchors used normally still work."""
    bomb, cycle, fine = tmp_path / "bomb.yaml", tmp_path / "cycle.yaml", tmp_path / "fine.yaml"
    bomb.write_text(BOMB)
    cycle.write_text("max_steps: 2\nlora: &x\n  inner: *x\n")
    fine.write_text("base: &lr 0.01\nlearning_rate: *lr\n")
    for script in ("recipes/sft.py", "recipes/pipeline.py"):
        start = time.perf_counter()
        message = run_main(script, "--config", bomb, "--dry_run", monkeypatch=monkeypatch)
        assert time.perf_counter() - start < 5
        assert message == (f"error: {bomb}: the YAML expands to more than 100,000 values through its aliases "
                           f"(*name); a config file this large is a mistake or an attack"), script
        assert run_main(script, "--config", cycle, "--dry_run", monkeypatch=monkeypatch) == \
            f"error: {cycle}:2: a YAML alias refers to a value that contains it"
    from minift.config import read_yaml

    assert read_yaml(fine)["learning_rate"] == (0.01, 2)


def _model_copy(tiny_dir: Path, tmp_path: Path, name: str) -> Path:
    model = tmp_path / name
    shutil.copytree(tiny_dir, model)
    return model


def test_broken_weight_files_are_one_line_naming_the_file(tiny_dir, random_adapters, tmp_path, monkeypatch,
                                                          capsys):
    """A Git LFS pointer in place of model.safetensors, the file cut short, and a header claiming a 100 GB tensor:
    each is one error naming the file, from a recipe, the generate tool and as an adapter."""
    weights = (tiny_dir / "model.safetensors").read_bytes()
    header_len = struct.unpack("<Q", weights[:8])[0]
    header = json.loads(weights[8:8 + header_len])
    first = next(k for k in header if k != "__metadata__")
    header[first]["data_offsets"][1] = 100 * 2**30
    lying = json.dumps(header).encode()
    cases = {
        "lfs": (b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 1143424\n",
                "is a Git LFS pointer, not the weights: run `git lfs pull`"),
        "cut": (weights[:len(weights) // 2], "is truncated: its tensors need"),
        "huge": (struct.pack("<Q", len(lying)) + lying + weights[8 + header_len:],
                 "is truncated: its tensors need 107,374,182,400 bytes"),
    }
    for name, (data, message) in cases.items():
        model = _model_copy(tiny_dir, tmp_path, name)
        (model / "model.safetensors").write_bytes(data)
        error = run_main("recipes/sft.py", "--model_name_or_path", model, "--max_steps", 1, "--output_dir",
                         tmp_path / f"out-{name}", monkeypatch=monkeypatch)
        assert error.startswith(f"error: {model / 'model.safetensors'} ") and message in error, (name, error)
        assert "\n" not in error
        capsys.readouterr()
        assert run_main("tools/generate.py", model, "--prompt", "hi", monkeypatch=monkeypatch) == "1"
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (name, lines)
    adapter = tmp_path / "adapter"
    shutil.copytree(random_adapters / "a", adapter)
    (adapter / "adapter_model.safetensors").write_bytes(cases["lfs"][0])
    error = run_main("recipes/sft.py", "--init_adapter", adapter, "--max_steps", 1, "--output_dir", tmp_path / "o",
                     monkeypatch=monkeypatch)
    assert error.startswith(f"error: {adapter / 'adapter_model.safetensors'} is a Git LFS pointer"), error


def test_convert_refuses_to_write_over_its_input(tiny_dir, tmp_path, monkeypatch, capsys):
    model = _model_copy(tiny_dir, tmp_path, "model")
    before = (model / "model.safetensors").read_bytes()
    for target in ("model.safetensors", "config.json", "tokenizer.json"):
        assert run_main("tools/convert_to_gguf.py", model, "-o", model / target, monkeypatch=monkeypatch) == "1"
        assert capsys.readouterr().err.strip().splitlines() == [
            f"error: {model / target} is one of the conversion's input files; write the GGUF to a new .gguf path"]
    assert (model / "model.safetensors").read_bytes() == before
    from minift.export.gguf.convert import convert

    assert convert(model, model / "model.gguf").is_file()  # a new file next to the weights is fine


def test_broken_chat_template_names_its_line_before_the_model_loads(tmp_path, monkeypatch):
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}\n{{ m['content'] }\n{% endfor %}\n")
    monkeypatch.setattr("minift.model.load.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    error = run_main("recipes/sft.py", "--chat_template", template, "--output_dir", tmp_path / "out",
                     monkeypatch=monkeypatch)
    assert error.startswith(f"error: {template}:2: chat template syntax error: unexpected '}}'"), error
    assert run_main("recipes/sft.py", "--chat_template", template, "--dry_run", monkeypatch=monkeypatch) == error


def test_data_whose_answers_are_all_empty_is_an_error(tmp_path, monkeypatch):
    data = tmp_path / "empty.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": ""}) + "\n" for i in range(8)))
    error = run_main("recipes/sft.py", "--dataset_name_or_path", data, "--output_dir", tmp_path / "out",
                     monkeypatch=monkeypatch)
    assert error.startswith(f"error: {data}:1: the assistant's answer is empty"), error
    error = run_main("recipes/sft.py", "--dataset_name_or_path", data, "--skip_invalid", "true", "--output_dir",
                     tmp_path / "out", monkeypatch=monkeypatch)
    assert error.startswith("error: no usable sft records (skipped as invalid: "), error


def test_what_minift_writes_has_the_usual_modes(tiny_dir, tmp_path, monkeypatch):
    """Under umask 022 every file minift writes is 0644 and every directory 0755: the adapter, its checkpoints, the
    merged model (the safetensors library alone creates 0600 files, mkdtemp 0700 directories)."""
    old = os.umask(0o022)
    try:
        out = tmp_path / "out"
        assert run_main("recipes/sft.py", "--max_steps", 2, "--save_steps", 1, "--merge_output", "true",
                        "--answer_eval_dataset", "none", "--output_dir", out, monkeypatch=monkeypatch) == ""
    finally:
        os.umask(old)
    checked = {p: p.stat().st_mode & 0o777 for p in out.rglob("*") if not p.is_symlink()}
    assert {"adapter/adapter_model.safetensors", "checkpoint-1/adapter/adapter_model.safetensors",
            "merged/model.safetensors", "checkpoint-2", "merged"} <= {str(p.relative_to(out)) for p in checked}
    wrong = {str(p.relative_to(out)): oct(m) for p, m in checked.items() if m != (0o755 if p.is_dir() else 0o644)}
    assert not wrong, wrong
    save_file({"x": torch.zeros(1)}, str(tmp_path / "raw.safetensors"))  # what the library alone does
    assert (tmp_path / "raw.safetensors").stat().st_mode & 0o777 == 0o600


def test_a_missing_optional_package_fails_the_dry_run(tmp_path, monkeypatch):
    """--report_to tensorboard without tensorboard, --use_4bit without bitsandbytes: one error line at config time
    (so --dry_run fails too), naming what to install; before, the run went on untracked or died an hour in."""
    import importlib.util

    real = importlib.util.find_spec
    gone = {"tensorboard", "tensorboardX", "bitsandbytes"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in gone else real(name, *a))
    for flag, value, package in (("report_to", "tensorboard", "tensorboard"), ("use_4bit", "true", "bitsandbytes")):
        error = run_main("recipes/sft.py", f"--{flag}", value, "--output_dir", tmp_path / "out", "--dry_run",
                         monkeypatch=monkeypatch)
        what = "use_4bit" if flag == "use_4bit" else f"{flag} {value}"
        assert error == (f"error: command line: {what} needs the {package} package, which is not installed: "
                         f"pip install {package}"), error


def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    import errno

    from minift.train import checkpoints

    real, calls = checkpoints.write_manifest, []

    def full_disk_at_the_second(directory):
        calls.append(directory)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(directory)

    monkeypatch.setattr(checkpoints, "write_manifest", full_disk_at_the_second)
    out = tmp_path / "out"
    error = run_main("recipes/sft.py", "--max_steps", 3, "--save_steps", 1, "--answer_eval_dataset", "none",
                     "--output_dir", out, monkeypatch=monkeypatch)
    assert error == (f"error: could not write checkpoint {out / 'checkpoint-2'}: No space left on device; the previous "
                     f"checkpoint {out / 'checkpoint-1'} is intact. Free space (or pick another output_dir) and resume "
                     f"with --resume_from_checkpoint auto"), error
    assert sorted(p.name for p in out.iterdir() if p.name.startswith((".checkpoint", "checkpoint"))) == ["checkpoint-1"]
    assert checkpoints.checkpoint_damage(out / "checkpoint-1") is None
