"""recipes/grpo.py: GRPO and RLOO learn the demo from a weak SFT start; rollouts are the same for 1 and 2
processes and after a SIGKILL + resume; bad configs, data and rewards fail with one clear error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DEMO_PROMPTS, _ProcessState, assert_same_adapter, load_recipe, logged, sigkill_when
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
GRPO = ROOT / "recipes" / "grpo.py"


def run_grpo(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(GRPO), *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("advantage, epochs, gain", [("grpo", 16.0, 0.20), ("rloo", 8.0, 0.10)])
def test_rl_raises_held_out_exact_match(weak_sft, tmp_path, advantage, epochs, gain):
    """From the weak start, the recipe's defaults (exact-match reward on the demo prompts) raise held-out greedy
    exact match by the issue's margins: GRPO >= 20 points; RLOO >= 10 in half the steps (measured: 44% -> 59%,
    4 minutes here; 66% with the full 16 epochs)."""
    adapter, before = weak_sft
    grpo = load_recipe("grpo")
    with _ProcessState():
        result = grpo.main(grpo.GRPOConfig(init_adapter=str(adapter), advantage=advantage, output_dir=str(tmp_path),
                                           num_train_epochs=epochs, logging_steps=50))
    assert result["answer_accuracy_before"] == pytest.approx(before)
    assert result["answer_accuracy"] >= before + gain, result
    rewards = logged(tmp_path, "reward")
    first, last = list(rewards.values())[:3], list(rewards.values())[-3:]
    assert sum(last) / 3 > sum(first) / 3 + 0.1, rewards  # the sampled completions' reward rose too


def small_run(weak_sft, tmp_path) -> list[str]:
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(DEMO_PROMPTS.read_text().splitlines(keepends=True)[:64]))
    return ["--init_adapter", weak_sft[0], "--dataset_name_or_path", data, "--answer_eval_dataset", "none",
            "--max_steps", "6", "--logging_steps", "1", "--num_generations", "4", "--learning_rate", "1e-3",
            "--beta", "0.05", "--epsilon_high", "0.28"]


@pytest.mark.slow
def test_two_processes_draw_the_same_rollouts_as_one(weak_sft, tmp_path):
    """torchrun with 2 CPU processes x 8 completions trains the same adapter as 1 process x 16: every rollout,
    reward and token-normalized loss term is the same."""
    args = small_run(weak_sft, tmp_path)
    two, one = tmp_path / "two", tmp_path / "one"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(GRPO), *map(str, args), "--per_device_train_batch_size", "8", "--output_dir", str(two)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_grpo(*args, "--per_device_train_batch_size", "16", "--output_dir", one, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for key in ("reward", "completion_length", "kl", "loss"):
        a, b = logged(two, key), logged(one, key)
        assert all(a[s] == pytest.approx(b[s], abs=1e-5) for s in range(1, 7)), (key, a, b)
    assert_same_adapter(two / "adapter", one / "adapter", atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("iterations", [1, 2])
def test_resume_after_sigkill_equals_the_uninterrupted_run(weak_sft, tmp_path, iterations):
    """Killed after checkpoint-4 and resumed, the run ends with the uninterrupted run's adapter; with two updates
    per rollout batch too (checkpoints fall where a batch is made)."""
    args = [*small_run(weak_sft, tmp_path), "--per_device_train_batch_size", "16", "--save_steps", "2",
            "--max_steps", "8", "--num_iterations", iterations]
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    assert run_grpo(*args, "--output_dir", whole).returncode == 0
    victim = subprocess.Popen([sys.executable, str(GRPO), *map(str, args), "--output_dir", str(killed)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sigkill_when(victim, killed / "checkpoint-4" / "trainer_state.json")
    resumed = run_grpo(*args, "--output_dir", killed, "--resume_from_checkpoint", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_file(str(killed / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(whole / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert logged(killed, "reward") == pytest.approx(logged(whole, "reward"), abs=1e-6)


def test_bad_input_fails_before_training_with_one_clear_error(tiny_dir, tmp_path):
    no_answer = tmp_path / "no_answer.jsonl"
    no_answer.write_text('{"prompt": "Reverse the words: a b", "answer": "b a"}\n{"prompt": "Reverse the words: c"}\n')
    (tmp_path / "bad_reward.py").write_text("def nan(prompts, completions):\n    return [float('nan')] * len(completions)\n")
    cases = [(["--per_device_train_batch_size", "12"], "must divide by num_generations (8): use a multiple of 8"),
             (["--dataset_name_or_path", no_answer], "no_answer.jsonl:2: the reward exact_match needs the field 'answer'"),
             (["--reward", "no_such_module_xyz:f"], "cannot import no_such_module_xyz"),
             (["--reward", f"{tmp_path / 'bad_reward.py'}:nan", "--max_steps", "1"],
              "reward nan returned nan at prompt 0 (completion 0)"),
             (["--beta", "0.1", "--lora_r", "0"], "beta > 0 compares with the start model"),
             (["--num_iterations", "2", "--save_steps", "3"], "save_steps (3) must be a multiple of num_iterations (2)"),
             (["--num_iterations", "0"], "num_iterations must be >= 1")]
    for args, message in cases:
        proc = run_grpo(*args, "--output_dir", tmp_path / "out", "--answer_eval_dataset", "none", timeout=300)
        assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr, \
            (args, proc.stderr[-2000:])


def test_rloo_folds_the_kl_into_its_rewards(weak_sft, tmp_path):
    """RLOO with beta > 0: the KL to the start model shapes the rewards (no KL loss term, so none logged)."""
    args = [*small_run(weak_sft, tmp_path), "--advantage", "rloo", "--max_steps", "2", "--per_device_train_batch_size",
            "16", "--output_dir", tmp_path / "rloo"]
    proc = run_grpo(*args, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert logged(tmp_path / "rloo", "reward") and not logged(tmp_path / "rloo", "kl")


def test_num_iterations_and_dynamic_sampling(weak_sft, tmp_path):
    """num_iterations 2: each rollout batch serves two updates (the same rewards logged twice), the second with
    ratios to the rollout policy (its loss differs); dynamic sampling logs the informative share and refills."""
    out = tmp_path / "mu2"
    args = [*small_run(weak_sft, tmp_path), "--max_steps", "4", "--per_device_train_batch_size", "16",
            "--num_iterations", "2", "--dynamic_sampling", "--output_dir", out]
    proc = run_grpo(*args, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rollout = {s: (r, logged(out, "reward_std")[s], logged(out, "completion_length")[s])
               for s, r in logged(out, "reward").items()}
    assert rollout[1] == rollout[2] and rollout[3] == rollout[4] and rollout[2] != rollout[3], rollout
    loss = logged(out)
    assert loss[1] != loss[2], loss
    informative, refills = logged(out, "informative_groups"), logged(out, "refills")
    assert set(informative) == {1, 2, 3, 4} and all(0 <= v <= 1 for v in informative.values())
    assert all(v >= 0 for v in refills.values()) and 0 < logged(out, "generate_share")[1] < 1
