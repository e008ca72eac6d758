"""recipes/ppo.py: PPO learns the demo from the weak SFT start (exact-match reward, and a reward model); the value
adapter and head are saved and restored, so a SIGKILL + resume ends as the uninterrupted run and 2 processes train
as 1; bad configs fail with one clear error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DEMO_PROMPTS, _ProcessState, assert_same_adapter, load_recipe, logged, sigkill_when
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
PPO = ROOT / "recipes" / "ppo.py"


def run_ppo(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PPO), *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def small_run(weak_sft, tmp_path) -> list[str]:
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(DEMO_PROMPTS.read_text().splitlines(keepends=True)[:64]))
    return ["--init_adapter", weak_sft[0], "--dataset_name_or_path", data, "--answer_eval_dataset", "none",
            "--logging_steps", "1", "--target_kl", "0.01", "--kl_horizon", "100", "--missing_eos_penalty", "1"]


def same_weights(a: Path, b: Path, atol: float) -> None:
    """Both trained parts equal: the policy and value adapters (as weight deltas) and the value head."""
    assert_same_adapter(a / "adapter", b / "adapter", atol=atol)
    assert_same_adapter(a / "adapter_value", b / "adapter_value", atol=atol)
    x, y = load_file(str(a / "value_head.safetensors")), load_file(str(b / "value_head.safetensors"))
    assert x.keys() == y.keys() and all((x[k] - y[k]).abs().max() <= atol for k in x)


@pytest.mark.slow
def test_resume_after_sigkill_equals_the_uninterrupted_run(weak_sft, tmp_path):
    """2 PPO epochs x 2 minibatches per rollout batch, adaptive KL: killed after checkpoint-4 (two rollout batches)
    and resumed, the run ends with the uninterrupted run's policy, value adapter, value head and KL coefficient.
    DeepSpeed, installed here, is not imported (its import prints a CPU-accelerator warning)."""
    args = [*small_run(weak_sft, tmp_path), "--per_device_train_batch_size", "16", "--ppo_epochs", "2",
            "--num_minibatches", "2", "--save_steps", "4", "--max_steps", "8"]
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    proc = run_ppo(*args, "--output_dir", whole)
    assert proc.returncode == 0 and "accelerator to CPU" not in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    victim = subprocess.Popen([sys.executable, str(PPO), *map(str, args), "--output_dir", str(killed)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sigkill_when(victim, killed / "checkpoint-4" / "trainer_state.json")
    resumed = run_ppo(*args, "--output_dir", killed, "--resume_from_checkpoint", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    same_weights(killed, whole, atol=1e-6)
    for key in ("kl_coef", "value_loss", "reward"):
        assert logged(killed, key) == pytest.approx(logged(whole, key), abs=1e-6), key
    coef = logged(whole, "kl_coef")
    assert coef[1] == coef[4] == 0.01 and coef[5] != coef[4]  # moved after each rollout batch, restored on resume
    for key in ("value_loss", "explained_variance", "approx_kl", "clip_frac", "kl", "generate_share"):
        assert set(logged(whole, key)) == set(range(1, 9)), key
    assert (whole / "adapter_value" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_gradient_checkpointing_trains_what_a_plain_run_trains(weak_sft, tmp_path):
    """With a value adapter (each pass switches adapters, and its backward recomputes checkpointed layers), a run
    with gradient checkpointing ends with the plain run's policy, value adapter and value head."""
    args = [*small_run(weak_sft, tmp_path), "--per_device_train_batch_size", "16", "--ppo_epochs", "2",
            "--num_minibatches", "2", "--max_steps", "4", "--value_model", "adapter"]
    for name, checkpointing in (("plain", "false"), ("checkpointed", "true")):
        proc = run_ppo(*args, "--gradient_checkpointing", checkpointing, "--output_dir", tmp_path / name)
        assert proc.returncode == 0, proc.stderr[-3000:]
    same_weights(tmp_path / "checkpointed", tmp_path / "plain", atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("value_model", ["adapter", "shared"])
def test_two_processes_train_as_one(weak_sft, tmp_path, value_model):
    """torchrun with 2 CPU processes x 8 prompts trains what 1 process x 16 does: the rollouts, the whitening and
    the KL controller see the whole batch."""
    args = [*small_run(weak_sft, tmp_path), "--max_steps", "4", "--ppo_epochs", "2", "--value_model", value_model]
    two, one = tmp_path / "two", tmp_path / "one"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(PPO), *map(str, args), "--per_device_train_batch_size", "8", "--output_dir", str(two)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_ppo(*args, "--per_device_train_batch_size", "16", "--output_dir", one, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for key in ("reward", "kl_coef", "loss", "value_loss"):
        a, b = logged(two, key), logged(one, key)
        assert all(a[s] == pytest.approx(b[s], abs=1e-5) for s in range(1, 5)), (key, a, b)
    assert_same_adapter(two / "adapter", one / "adapter", atol=1e-5)
    if value_model == "adapter":
        assert_same_adapter(two / "adapter_value", one / "adapter_value", atol=1e-5)
    else:
        assert not (one / "adapter_value").exists()


@pytest.mark.slow
def test_ppo_raises_held_out_exact_match(weak_sft, tmp_path):
    """From the weak start, the recipe's defaults (exact-match reward) raise held-out greedy exact match by >= 15
    points."""
    adapter, before = weak_sft
    ppo = load_recipe("ppo")
    with _ProcessState():
        result = ppo.main(ppo.PPOConfig(init_adapter=str(adapter), output_dir=str(tmp_path), logging_steps=25))
    assert result["answer_accuracy_before"] == pytest.approx(before)
    assert result["answer_accuracy"] >= before + 0.15, result
    rewards = logged(tmp_path, "reward")
    first, last = list(rewards.values())[:3], list(rewards.values())[-3:]
    assert sum(last) / 3 > sum(first) / 3 + 0.1, rewards


def test_bad_configs_fail_with_one_clear_error(tiny_dir, tmp_path):
    cases = [(["--value_model", "twin"], "value_model must be adapter or shared"),
             (["--lora_r", "0"], "PPO keeps the start model as its reference"),
             (["--per_device_train_batch_size", "6", "--num_minibatches", "4"], "must divide into num_minibatches"),
             (["--ppo_epochs", "2", "--save_steps", "3"], "save_steps (3) must be a multiple of ppo_epochs x"),
             (["--ppo_epochs", "0"], "ppo_epochs and num_minibatches must be >= 1")]
    for args, message in cases:
        proc = run_ppo(*args, "--output_dir", tmp_path / "out", timeout=120)
        assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr, \
            (args, proc.stderr[-2000:])
