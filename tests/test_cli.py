"""The ``minift`` command: every recipe and tool by name, one quiet process, one ``error:`` line on a mistake,
and a non-editable install that holds the recipes, their data and the tools."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from minift import cli

ROOT = Path(__file__).resolve().parents[1]
USER_TOOLS = {"generate": "generate.py", "evaluate": "evaluate.py", "serve": "serve.py",
              "convert": "convert_to_gguf.py", "merge": "merge_adapter.py"}


def test_help_lists_every_recipe_and_tool(capsys):
    recipes = sorted(p.stem for p in (ROOT / "recipes").glob("*.py") if p.stem != "__init__")
    found = cli.commands()
    assert list(found) == recipes + list(USER_TOOLS)
    assert found["sft"] == ROOT / "recipes" / "sft.py"  # the checkout's files themselves (an editable install)
    assert {name: found[name].name for name in USER_TOOLS} == USER_TOOLS
    assert cli.main(["--help"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[0].startswith("usage: minift COMMAND")
    assert "  sft           Supervised fine-tuning with LoRA / QLoRA / DoRA (or a full fine-tune), written out on " \
           "Accelerate." in listed
    assert all(any(line.startswith(f"  {name} ") for line in listed) for name in found)
    assert cli.main([]) == 2  # no command: the list, and a failing status


def test_an_unknown_command_names_the_closest(capsys):
    assert cli.main(["sftt", "--max_steps", "2"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: no command 'sftt'; did you mean 'sft'? commands: cot_distill, distill, dpo,")


def run_minift(*args, cwd: Path, python: str = sys.executable) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-m", "minift", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONWARNINGS": ""})


def test_a_mistake_is_one_error_line_and_nothing_else(tiny_dir, tmp_path):
    """One process, no launcher: a missing data file ends with exactly one line on stderr, the error, and nothing on
    stdout; so does a tool's mistake."""
    proc = run_minift("sft", "--model_name_or_path", tiny_dir, "--dataset_name_or_path", "missing.jsonl", cwd=tmp_path)
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr.splitlines() == ["error: dataset_name_or_path: missing.jsonl does not exist"]
    proc = run_minift("merge", tiny_dir, tmp_path / "no_adapter", "-o", tmp_path / "merged", cwd=tmp_path)
    assert proc.returncode == 1 and len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("error: ")
    assert not (tmp_path / "merged").exists()


@pytest.mark.slow
def test_a_wheel_install_runs_sft_from_an_empty_directory(tiny_dir, tmp_path):
    """``pip install .`` (not editable) into a fresh environment, then ``minift sft --max_steps 2`` from an empty
    directory: it trains, writes its adapter where its summary says, and prints no warning of Accelerate's (nor
    DeepSpeed's CPU-accelerator line: a run without DeepSpeed never imports it, installed or not). The
    installed package holds every module, recipe, tool, config and data file of the checkout. (The fresh
    environment borrows this one's site-packages for torch and the other dependencies, with no network.)"""
    env_dir = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", env_dir], check=True, timeout=300)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps",
                              "--no-build-isolation", "--no-index", ROOT],
                             capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    installed = site / "minift"
    expected = ({f"{p.relative_to(ROOT / 'minift')}" for p in (ROOT / "minift").rglob("*") if p.is_file()
                 and "__pycache__" not in p.parts}
                | {f"{folder}/{p.relative_to(ROOT / folder)}" for folder in ("recipes", "tools")
                   for p in (ROOT / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts})
    shipped = {f"{p.relative_to(installed)}" for p in installed.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert shipped == expected

    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([env_dir / "bin" / "minift", "sft", "--max_steps", "2", "--model_name_or_path", tiny_dir],
                          cwd=empty, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "were not passed" not in proc.stderr and "Traceback" not in proc.stderr
    assert "accelerator to CPU" not in proc.stdout + proc.stderr, proc.stdout[-3000:]
    assert "  adapter: out/sft/adapter" in proc.stderr.splitlines(), proc.stderr[-3000:]  # the summary (a log)
    assert (empty / "out" / "sft" / "adapter" / "adapter_model.safetensors").is_file()
    assert (empty / "out" / "sft" / "run.json").is_file()
    where = subprocess.run([python, "-c", "import minift.cli; print(minift.cli.commands()['sft'])"], cwd=empty,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert where == str(installed / "recipes" / "sft.py")  # the wheel's own copy, not the checkout's
