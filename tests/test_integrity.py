"""Nothing lost, nothing trained wrong: damaged checkpoints are caught and skipped, a resume that changes what
the run trains is refused, one run at a time per output directory, divergence is named, and a failed hub
push keeps everything local. Runs the toy objective (tests/toy_objective.py) in-process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import load_toy_objective
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- damaged checkpoints


def corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "zero":
        path.write_bytes(bytes(len(data)))
    else:  # flip a byte in the middle
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:])


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory, tiny_dir):
    """A finished toy run with checkpoint-2 and checkpoint-4, and the adapter of its uninterrupted end."""
    from conftest import _ProcessState

    out = tmp_path_factory.mktemp("toy-checkpoints") / "run"
    with _ProcessState():
        load_toy_objective().main(load_toy_objective().ToyConfig(output_dir=str(out), max_steps=6, save_steps=2,
                                                                   save_total_limit=0))
    return out


def test_each_file_of_a_damaged_newest_checkpoint_is_caught_and_resume_falls_back(toy_run, tmp_path, caplog):
    """Every file of checkpoint-6, truncated, zeroed or with a byte flipped: resume skips it with a warning that
    names the file and the damage, and picks checkpoint-4; never the damaged one."""
    from minift.train.checkpoints import find_checkpoint

    files = sorted(p.relative_to(toy_run / "checkpoint-6") for p in (toy_run / "checkpoint-6").rglob("*")
                   if p.is_file())
    assert {"manifest.json", "trainer_state.json", "optimizer.pt", "rng.pt"} <= {str(f) for f in files}
    for file in files:
        for how in ("truncate", "zero", "flip"):
            out = tmp_path / f"{file.name}-{how}"
            shutil.copytree(toy_run, out)
            corrupt(out / "checkpoint-6" / file, how)
            caplog.clear()
            with caplog.at_level("WARNING", logger="minift.train.checkpoints"):
                assert find_checkpoint(str(out), "auto") == out / "checkpoint-4", (file, how)
            assert "checkpoint-6: " in caplog.text and "resuming from" in caplog.text, (file, how)
            if str(file) != "manifest.json":
                assert str(file) in caplog.text, (file, how, caplog.text)
            shutil.rmtree(out)


def test_an_edited_step_a_named_damaged_checkpoint_and_no_intact_one_are_refused(toy_run, tmp_path):
    from minift.config import ConfigError
    from minift.train.checkpoints import find_checkpoint

    out = tmp_path / "run"
    shutil.copytree(toy_run, out)
    state = out / "checkpoint-6" / "trainer_state.json"
    state.write_text(state.read_text().replace('"step": 6', '"step": 5'))  # same length: only the checksum can tell
    with pytest.raises(ConfigError, match=r"checkpoint-6 is damaged: trainer_state.json does not match its checksum"):
        find_checkpoint(str(out), str(out / "checkpoint-6"))
    for name in ("checkpoint-2", "checkpoint-4"):
        corrupt(out / name / "optimizer.pt", "flip")
    with pytest.raises(ConfigError, match=r"no intact checkpoint in .*checkpoint-6: trainer_state.json .*"
                                          r"checkpoint-4: optimizer.pt .*--overwrite_output_dir true"):
        find_checkpoint(str(out), "auto")


def test_resume_skips_a_damaged_checkpoint_ignores_strays_and_ends_like_an_uninterrupted_run(toy_run, tmp_path,
                                                                                             in_process, caplog):
    """A killed run's state: checkpoint-6 damaged, no final adapter, an abandoned temp dir of a save, an unrelated
    ``checkpoint-notes`` directory and a torn last metrics line. ``--resume_from_checkpoint auto`` resumes at
    step 4, removes the temp dir, drops the torn line, and ends with the uninterrupted run's adapter."""
    out = tmp_path / "run"
    shutil.copytree(toy_run, out)
    for leftover in ("adapter", "run.json"):
        shutil.rmtree(out / leftover) if (out / leftover).is_dir() else (out / leftover).unlink()
    corrupt(out / "checkpoint-6" / "rng.pt", "flip")
    (out / ".checkpoint-8.tmp-abc123").mkdir()
    (out / "checkpoint-notes").mkdir()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')
    toy = load_toy_objective()
    with caplog.at_level("INFO"):
        toy.main(toy.ToyConfig(output_dir=str(out), max_steps=6, save_steps=2, resume_from_checkpoint="auto"))
    assert "at step 4" in caplog.text and "rng.pt does not match its checksum" in caplog.text
    assert "dropped unreadable line(s) 7" in caplog.text
    assert not (out / ".checkpoint-8.tmp-abc123").exists() and (out / "checkpoint-notes").is_dir()
    a = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(toy_run / "adapter" / "adapter_model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == list(range(1, 7))


def test_a_failed_hub_push_keeps_everything_and_says_where(tmp_path, in_process, monkeypatch):
    import huggingface_hub

    from minift.train.outputs import HubPushError

    class OfflineApi:
        def create_repo(self, *a, **k):
            raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "HfApi", OfflineApi)
    toy = load_toy_objective()
    out = tmp_path / "run"
    with pytest.raises(HubPushError, match=rf"pushing {out / 'adapter'} to me/toy failed \(ConnectionError: no "
                                           rf"network\); everything is saved locally in {out}"):
        toy.main(toy.ToyConfig(output_dir=str(out), max_steps=2, push_to_hub=True, hub_repo_id="me/toy"))
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "adapter" / "README.md").is_file()
    assert json.loads((out / "run.json").read_text())["metrics"]["step"] == 2


# ----------------------------------------------------------------------------- a resume must be the same run


def test_a_resume_that_changes_what_the_run_trains_is_refused(toy_run, tmp_path, in_process, caplog, monkeypatch):
    """A different learning rate or LoRA rank is refused before any weight loads, naming each change (old ->
    new) and how to start afresh; changing how often it logs or saves, or where it writes, is allowed."""
    from minift.config import ConfigError

    toy = load_toy_objective()
    out = tmp_path / "run"
    shutil.copytree(toy_run, out)
    shutil.rmtree(out / "checkpoint-6")

    def no_loading(*args):
        raise AssertionError("weights loaded before the settings were checked")

    with monkeypatch.context() as patch, pytest.raises(ConfigError, match=r"cannot resume .*checkpoint-4: learning_rate 0.003 -> 0.01; lora_r 16 -> 8\. "
                                          r"These settings change what the run trains; .*--overwrite_output_dir true"):
        patch.setattr("minift.train.stage.load_for_training", no_loading)
        toy.main(toy.ToyConfig(output_dir=str(out), max_steps=6, save_steps=2, resume_from_checkpoint="auto",
                               learning_rate=0.01, lora_r=8))
    with caplog.at_level("INFO"):
        toy.main(toy.ToyConfig(output_dir=str(out), max_steps=6, save_steps=3, logging_steps=2, step_sleep=0.01,
                               resume_from_checkpoint="auto"))
    assert "resumed from" in caplog.text and "at step 4" in caplog.text
    a = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(toy_run / "adapter" / "adapter_model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_run_settings_leave_out_only_what_a_resume_may_change(tmp_path):
    """Recipe subclasses that only change a default keep the base's ``resumable`` mark; paths are compared
    resolved; eval_steps counts once early stopping depends on it."""
    from minift.config import run_settings

    toy = load_toy_objective()
    data = tmp_path / "notes.txt"
    data.write_text("x")
    a = run_settings(toy.ToyConfig(output_dir=str(tmp_path / "a"), init_adapter=None, model_name_or_path=str(data)))
    b = run_settings(toy.ToyConfig(output_dir="elsewhere", logging_steps=5, save_steps=9, report_to="tensorboard",
                                   model_name_or_path=str(tmp_path / "." / "notes.txt")))
    assert a == b and "output_dir" not in a and "step_sleep" not in a and a["model_name_or_path"] == str(data)
    assert {"learning_rate", "lora_r", "seq_len", "seed", "max_steps"} <= a.keys() and "eval_steps" not in a
    assert "eval_steps" in run_settings(toy.ToyConfig(early_stopping_patience=2, eval_steps=2))


# ----------------------------------------------------------------------------- one run per output directory


def test_a_second_run_on_a_busy_output_dir_is_refused_and_a_dead_runs_lock_is_taken_over(tmp_path, tiny_dir,
                                                                                         in_process, caplog):
    """While a run trains, a second one on its directory (even with --overwrite_output_dir) exits 1 naming the
    first one's pid; once the first is killed, the next run says so and takes the directory over."""
    toy_script = ROOT / "tests" / "toy_objective.py"
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, str(toy_script), "--output_dir", str(out), "--step_sleep", "0.5"],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not (out / "metrics.jsonl").exists():
            assert first.poll() is None and time.monotonic() < deadline, "the first run did not start training"
            time.sleep(0.05)
        for extra in ([], ["--overwrite_output_dir", "true"]):
            second = subprocess.run([sys.executable, str(toy_script), "--output_dir", str(out), *extra], cwd=ROOT,
                                    capture_output=True, text=True, timeout=240)
            assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr[-2000:]
            assert second.stderr.strip().splitlines()[-1].startswith(
                f"error: output_dir {out} is in use by another run (pid {first.pid} on "), second.stderr[-500:]
        assert first.poll() is None and (out / "metrics.jsonl").exists()
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    toy = load_toy_objective()
    with caplog.at_level("WARNING", logger="minift.train.lock"):
        toy.main(toy.ToyConfig(output_dir=str(out), max_steps=2, overwrite_output_dir=True))
    assert f"a run that did not finish (pid {first.pid} on " in caplog.text and "taking over" in caplog.text
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert (out / ".minift.lock").read_text() == ""  # released: the next run starts without a warning


# ----------------------------------------------------------------------------- divergence


class _OneProcess:
    device, mixed_precision = torch.device("cpu"), "no"

    def gather(self, tensor):
        return tensor


def health(tmp_path, params=(), mixed_precision="no"):
    from minift.train.health import Health

    accelerator = _OneProcess()
    accelerator.mixed_precision = mixed_precision
    return Health(accelerator, tmp_path, list(params), [])


def test_an_exploding_loss_is_warned_about_once_and_ordinary_curves_are_not(tmp_path):
    """Far above the running mean (> mean + 3 * max(|mean|, 1)) is an explosion; a falling DPO loss, RL losses
    wandering around zero and small rises are not."""
    steady = health(tmp_path)
    for step, loss in enumerate([2.0] * 5 + [7.9], 1):
        steady.check_loss(loss, step)
    exploding = health(tmp_path)
    for step, loss in enumerate([2.0] * 5 + [8.5, 40.0, 300.0], 1):
        exploding.check_loss(loss, step)
    assert steady.warnings == []
    assert exploding.warnings == ["exploding loss: 8.5 at step 6, against a mean of 2 over the 5 steps before: the "
                                  "run may be diverging (lower --learning_rate, or check the data)"]
    generator = torch.Generator().manual_seed(0)
    curves = {"dpo": [0.69 * 0.97 ** s for s in range(100)], "rl": (torch.rand(100, generator=generator) - 0.5).tolist(),
              "small rise": [0.01 * 1.04 ** s for s in range(100)]}
    for name, curve in curves.items():
        h = health(tmp_path)
        for step, loss in enumerate(curve, 1):
            h.check_loss(loss, step)
        assert h.warnings == [], name


def test_a_gradient_stuck_at_zero_is_warned_about_and_a_non_finite_one_stops_the_run(tmp_path):
    h = health(tmp_path)
    for step, norm in enumerate([1.0, 0.0, 0.0, 0.0, 0.0, 0.3, 0.0, 0.0, 0.0, 0.0], 1):
        h.check_gradient(torch.tensor(norm), step)
    assert h.warnings == []  # never five zeros in a row
    h.check_gradient(torch.tensor(0.0), 11)
    assert h.warnings == ["zero gradient: the gradient norm has been 0 since step 7: nothing is learning (weights "
                          "diverged or saturated by a learning rate too high, or no trained tokens)"]
    h.check_gradient(None, 12)  # clipping off: nothing to check
    with pytest.raises(FloatingPointError, match=r"gradient norm is inf at step 3; stopping\. The last good checkpoint "
                                                 r"is none \(none was saved yet\)"):
        h.check_gradient(torch.tensor(float("inf")), 3)
    health(tmp_path, mixed_precision="fp16").check_gradient(torch.tensor(float("nan")), 3)  # the scaler skips it


def test_weights_beyond_float16_are_unhealthy_and_non_finite_ones_stop_the_run(tmp_path):
    weights = [torch.zeros(0), torch.full((2, 3), 0.5)]
    h = health(tmp_path, weights)
    assert h.check_weights(1) and h.warnings == []
    weights[1][0, 1] = -7e4
    assert not h.check_weights(2)
    assert h.warnings == ["huge weights: trainable weights reach 7e+04 at step 2, beyond float16's range (65504): "
                          "the run has diverged (lower --learning_rate)"]
    weights[1][1, 2] = float("nan")
    with pytest.raises(FloatingPointError, match=r"trainable weights are not finite at step 3"):
        h.check_weights(3)
