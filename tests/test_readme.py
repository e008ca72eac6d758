"""The README stays true: CI runs its test command verbatim, every other command in it runs (a few steps, or a dry
run), and its code example of the losses runs."""

from __future__ import annotations

import json
import os
import re
import runpy
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import _ProcessState

from minift import cli

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """The commands of the README's bash blocks (lines continued with a backslash joined)."""
    text = (ROOT / "README.md").read_text()
    blocks = [b.replace("\\\n", " ") for b in re.findall(r"```bash\n(.*?)```", text, re.S)]
    return [line for block in blocks for line in block.splitlines() if line]


def test_ci_runs_the_readme_test_command():
    commands = readme_commands()
    test_commands = [c for c in commands if "pytest" in c]
    assert len(test_commands) == 1
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_commands[0] in ci
    # torch is pinned before anything can pull an unpinned (CUDA) build
    assert all(c.startswith("pip install torch==2.13.0 && ") for c in commands if c.startswith("pip install"))


DEMO = "pip install torch==2.13.0 && pip install -e . && minift sft_dpo"
# Long runs the README shows: checked with --dry_run here (tests/test_pipeline.py and tests/test_cot_distill.py run
# them for real). Commands with launcher options (GPUs, FSDP, DeepSpeed) or an API endpoint (a judge, a teacher, a
# rollout server: tests/test_remote_rollouts.py runs those against tools/serve.py) are dry runs too.
DRY = ("pipeline.py", "cot_distill.py")
FEW_STEPS = ["--max_steps", "2", "--logging_steps", "1", "--overwrite_output_dir", "true", "--answer_eval_dataset",
             "none"]
LAUNCHER_FLAGS = {"--multi_gpu": 0, "--num_processes": 1, "--config_file": 1, "--num_cpu_threads_per_process": 1,
                  "--mixed_precision": 1}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_once(argv: list[str], cwd: Path, env: dict) -> None:
    """Start the server the README shows, on a free port, ask it for its models (its named adapters among them),
    and stop it."""
    port = free_port()
    argv = [str(port) if prev == "--port" else a for prev, a in zip([None, *argv], argv)]
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as reply:
                    models = {m["id"] for m in json.loads(reply.read())["data"]}
                named = {a.split("=")[0] for prev, a in zip(argv, argv[1:]) if prev == "--adapter"}
                assert models and named <= models, models
                return
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.5)
        pytest.fail("tools/serve.py did not answer within 120 s")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def script_of(command: str) -> str:
    """The file a ``minift`` command runs, relative to the repository (``recipes/sft.py`` for ``sft``)."""
    return str(cli.commands()[command].relative_to(ROOT))


def as_test_run(command: str) -> list[str]:
    """How the test runs a README command: ``python SCRIPT ARGS`` (``minift X`` as the script it runs)."""
    words = shlex.split(command.removesuffix("&").strip())  # a server started in the background: run as the rest
    while "=" in words[0] and not words[0].startswith("-"):  # VAR=value prefixes go to the environment
        words.pop(0)
    if words[0] == "python":
        return [sys.executable, *words[1:]]
    launcher = []
    if words[:2] == ["accelerate", "launch"]:
        words = words[2:]
        while words[0] in LAUNCHER_FLAGS:
            launcher += words[: 1 + LAUNCHER_FLAGS[words[0]]]
            words = words[1 + LAUNCHER_FLAGS[words[0]]:]
        if words[0] == "-m":
            words = words[1:]
    assert words[0] == "minift" or words[0].endswith(".py"), f"a README command this test does not run: {command}"
    if words[0] == "minift":
        words = [script_of(words[1]), *words[2:]]
    if "--config_file" in launcher:
        assert (ROOT / launcher[launcher.index("--config_file") + 1]).is_file()
    script, args = words[0], words[1:]
    if script.startswith("tools/"):  # the tools run as written
        return [sys.executable, script, *args]
    dry = launcher or Path(script).name in DRY or any(a.endswith("_api_base") or a == "--rollout_url" for a in args)
    if dry:
        return [sys.executable, script, *args, "--dry_run"]
    return [sys.executable, script, *args, *([] if Path(script).name == "sft_dpo.py" else FEW_STEPS)]


def run_in_process(argv: list[str], cwd: Path, env: dict, monkeypatch, command: str) -> None:
    """``python SCRIPT ARGS`` as ``__main__`` in this process (no interpreter start and imports per command)."""
    with monkeypatch.context() as mp, _ProcessState():
        mp.chdir(cwd)
        mp.setattr(sys, "argv", argv[1:])
        for key, value in env.items():
            mp.setenv(key, value)
        mp.syspath_prepend(str(ROOT / Path(argv[1]).parent))  # recipes import their siblings
        try:
            runpy.run_path(argv[1], run_name="__main__")
        except SystemExit as exit_:
            assert exit_.code in (0, None), f"{command}: {exit_.code}"


@pytest.mark.slow
def test_every_readme_command_runs(demo_chain, tmp_path, monkeypatch):
    """Each command of the README's bash blocks, in order, from a directory laid out like the repository: training
    commands for a few steps (so later commands find their adapters), long runs and those needing GPUs or an API
    with --dry_run, the tools as written (the server until it answers). Scripts run as ``__main__`` in this process,
    the server as a process of its own. The demo's outputs (out/sft_dpo) are the demo_chain fixture's: it runs the
    README's first command's recipe with its defaults."""
    for name in ("recipes", "tools", "tests"):
        (tmp_path / name).symlink_to(ROOT / name)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "sft_dpo").symlink_to(demo_chain[0])
    for name in ("my_sft.yaml", "my_dpo.yaml"):  # the files a command names as the reader's own
        (tmp_path / name).write_text("max_steps: 2\nanswer_eval_dataset: none\n")
    commands = readme_commands()
    assert commands[0] == DEMO
    ran = 0
    for command in commands[2:]:
        env = dict(w.split("=", 1) for w in shlex.split(command) if re.fullmatch(r"[A-Z_]+=\S*", w))
        if command.startswith("sbatch "):
            script = ROOT / command.split()[1]
            assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
            continue
        argv = as_test_run(command)
        if argv[1] == "tools/serve.py":
            serve_once(argv, tmp_path, {**os.environ, **env})
        else:
            run_in_process(argv, tmp_path, env, monkeypatch, command)
        ran += 1
    assert ran >= 25


def test_the_losses_example_runs():
    """The README's example of minift.losses in another project runs as printed."""
    text = (ROOT / "README.md").read_text()
    [block] = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "from minift.losses import" in b]
    exec(compile(block, "README.md", "exec"), {})


@pytest.mark.slow
def test_the_readme_demo_table_is_what_the_demo_prints(demo_chain):
    """The table the README shows for ``minift sft_dpo`` is the one the demo run prints: the same rows, each figure
    within one point (runs on the project's AVX-512 and AVX2 machines differ by one point in the DPO row)."""
    text = (ROOT / "README.md").read_text()
    start = text.index("```\nmodel      demo exact match") + len("```\n")
    shown = text[start: text.index("```", start)].strip().splitlines()
    printed = demo_chain[2].splitlines()
    start = printed.index(shown[0])
    measured = printed[start: start + len(shown)]
    assert [re.sub(r"\d+%", "", line).split() for line in shown] == \
           [re.sub(r"\d+%", "", line).split() for line in measured]
    for readme_line, line in zip(shown, measured):
        for shown_pct, got in zip(re.findall(r"(\d+)%", readme_line), re.findall(r"(\d+)%", line), strict=True):
            assert abs(int(shown_pct) - int(got)) <= 1, (readme_line, line)
