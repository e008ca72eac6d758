"""DeepSpeed ZeRO-2 and ZeRO-3 on 2 CPU processes (DeepSpeed's CPU accelerator over gloo), launched with the shipped
configs as users launch them: ``accelerate launch --config_file recipes/configs/accelerate_zero3.yaml
--num_processes 2 --mixed_precision no RECIPE``. The engine leaves gradient accumulation to minift
(minift/train/zero.py); each run equals 1 process with twice the batch: SFT with LoRA and in full, DPO with the
reference as the adapter switched off, GRPO, PPO, on-policy distillation. A ZeRO-3 full fine-tune killed after a
checkpoint resumes to the uninterrupted run's weights. A launch DeepSpeed cannot serve here fails before any
weights load, with one line."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_same_adapter, logged, sigkill_when
from test_fsdp import alone, assert_same_log, model_weights, sft_args

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
CONFIGS = RECIPES / "configs"


def launcher(zero: int, config: Path | None = None) -> list[str]:
    """``accelerate launch`` with the shipped ZeRO config (or ``config``), 2 CPU processes, fp32."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(config or CONFIGS / f"accelerate_zero{zero}.yaml"), "--num_processes", "2", "--mixed_precision", "no"]


def launch(zero: int, recipe: str, args: list, out: Path, *, config: Path | None = None,
           check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*launcher(zero, config), str(RECIPES / f"{recipe}.py"), *map(str, args),
                           "--output_dir", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("zero-data") / "sft.jsonl"
    path.write_text("".join((RECIPES / "data" / "demo_sft.jsonl").read_text().splitlines(True)[:64]))
    return path


def test_zero2_sft_lora_equals_one_process_and_resumes(sft_data, tmp_path, tiny_dir):
    """ZeRO-2 (optimizer state and gradients partitioned) x batch 2 == 1 process x batch 4: losses, gradient norms
    (the engine's, before its clipping), evaluation, the adapter. Resumed from checkpoint-3 it ends where the
    uninterrupted run does: the checkpoint holds each process's optimizer partition."""
    extra = ["--lora_r", "16", "--lora_alpha", "32", "--max_steps", "6", "--save_steps", "3"]
    launch(2, "sft", sft_args(sft_data, 2, *extra, eval_batch=8), tmp_path / "two")
    alone("sft", sft_args(sft_data, 4, *extra, eval_batch=8), tmp_path / "one")
    assert_same_log(tmp_path / "two", tmp_path / "one", ("loss", "grad_norm", "eval_loss"))
    assert_same_adapter(tmp_path / "two" / "adapter", tmp_path / "one" / "adapter", atol=1e-5)
    partitions = torch.load(tmp_path / "two" / "checkpoint-3" / "optimizer.pt", weights_only=True)
    assert len(partitions) == 2 and all(p["zero_stage"] == 2 for p in partitions)

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "two" / "checkpoint-3", resumed / "checkpoint-3")
    proc = launch(2, "sft", [*sft_args(sft_data, 2, *extra, eval_batch=8), "--resume_from_checkpoint", "auto"],
                  resumed)
    assert "resumed from" in proc.stderr
    assert_same_adapter(resumed / "adapter", tmp_path / "two" / "adapter", atol=1e-6)


def test_zero3_sft_full_equals_one_process_and_resumes_after_sigkill(sft_data, tmp_path, tiny_dir):
    """ZeRO-3 (every weight partitioned too) full fine-tune == 1 process; killed (the whole launch at once) after
    checkpoint-4 and resumed, it ends with the uninterrupted run's weights and logs each step once. The saved
    model is whole: gathered from the partitions."""
    extra = ["--lora_r", "0", "--learning_rate", "1e-4", "--max_steps", "12", "--save_steps", "4",
             "--max_seq_length", "128"]
    args = sft_args(sft_data, 2, *extra)
    launch(3, "sft", args, tmp_path / "two")
    alone("sft", sft_args(sft_data, 4, *extra), tmp_path / "one")
    two, one = model_weights(tmp_path / "two" / "model"), model_weights(tmp_path / "one" / "model")
    assert two.keys() == one.keys() and all(two[k].shape == one[k].shape for k in one)
    assert max((two[k] - one[k]).abs().max().item() for k in two) <= 1e-5

    killed = tmp_path / "killed"
    victim = subprocess.Popen([*launcher(3), str(RECIPES / "sft.py"), *map(str, args), "--output_dir", str(killed)],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    sigkill_when(victim, killed / "checkpoint-4" / "trainer_state.json", group=True)
    assert not (killed / "model").exists(), "the run finished before SIGKILL landed"
    resumed = launch(3, "sft", [*args, "--resume_from_checkpoint", "auto"], killed)
    assert "resumed from" in resumed.stderr
    again = model_weights(killed / "model")
    assert max((again[k] - two[k]).abs().max().item() for k in two) <= 1e-6
    assert [json.loads(x)["step"] for x in (killed / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(x)] == list(range(1, 13))


def test_zero3_dpo_with_the_adapter_off_as_reference_equals_one_process(tmp_path, tiny_dir):
    """The reference pass and the evaluation run with the weights gathered; the 12 held-out pairs make one eval
    batch, so the second process forwards nothing there (ZeRO-3's hooks are off inside the gathered block)."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join((RECIPES / "data" / "demo_preference.jsonl").read_text().splitlines(True)[:48]))
    args = ["--dataset_name_or_path", data, "--max_seq_length", "64", "--validation_split", "0.25",
            "--answer_eval_dataset", "none", "--logging_steps", "1", "--max_steps", "5", "--learning_rate", "3e-3",
            "--precompute_ref_log_probs", "false", "--per_device_eval_batch_size", "12", "--lora_r", "16",
            "--lora_alpha", "32"]
    launch(3, "dpo", [*args, "--per_device_train_batch_size", "2"], tmp_path / "two")
    alone("dpo", [*args, "--per_device_train_batch_size", "4"], tmp_path / "one")
    assert_same_log(tmp_path / "two", tmp_path / "one", ("loss", "rewards/margins", "grad_norm", "eval_loss"))
    assert_same_adapter(tmp_path / "two" / "adapter", tmp_path / "one" / "adapter", atol=1e-5)


def test_zero3_grpo_equals_one_process(weak_sft, tmp_path):
    """Each process samples its own rollouts (different lengths, so different forwards) with the weights gathered
    whole, then trains partitioned; with the greedy exact match before and after measured on the main process.
    The learning rate is below the FSDP case's 1e-3: Adam gives a gradient at rounding level (as lora_A's are
    while lora_B is still near 0) a full step of either sign, and at 1e-3 one module's delta differed by 1.9e-5
    here, with 34 of 32,768 factor elements off by more than 1e-5, while every logged metric agreed to 1e-6; at
    3e-4 the largest delta difference was 5.7e-6, with 1 element over 1e-5."""
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join((RECIPES / "data" / "demo_prompts.jsonl").read_text().splitlines(True)[:64]))
    args = ["--init_adapter", weak_sft[0], "--dataset_name_or_path", data, "--max_steps", "6", "--logging_steps", "1",
            "--num_generations", "4", "--learning_rate", "3e-4", "--beta", "0.05",
            "--answer_eval_dataset", RECIPES / "data" / "demo_eval.jsonl"]
    launch(3, "grpo", [*args, "--per_device_train_batch_size", "8"], tmp_path / "two")
    alone("grpo", [*args, "--per_device_train_batch_size", "16"], tmp_path / "one")
    assert_same_log(tmp_path / "two", tmp_path / "one", ("reward", "completion_length", "kl", "loss"))
    assert max(logged(tmp_path / "one", "reward").values()) > 0  # the rollouts were informative
    assert_same_adapter(tmp_path / "two" / "adapter", tmp_path / "one" / "adapter", atol=1e-5)
    two, one = (json.loads((tmp_path / run / "run.json").read_text())["metrics"] for run in ("two", "one"))
    assert two["answer_accuracy_before"] == one["answer_accuracy_before"] > 0  # the same start, measured whole
    assert two["answer_accuracy"] == pytest.approx(one["answer_accuracy"], abs=0.02)  # a near tie may flip one


def test_zero3_on_policy_distillation_with_the_teacher_beside_equals_one_process(sft_data, gpt2_dir, tmp_path):
    """A GPT-2 teacher, its head held beside the student in the engine's module (read as a tensor by the loss: an
    external parameter), and half the completions sampled by the student with its weights gathered."""
    args = ["--teacher_model_name_or_path", gpt2_dir, "--mode", "on_policy", "--lmbda", "0.5",
            "--max_completion_length", "8", *sft_args(sft_data, 2)[:-2], "--max_steps", "4", "--lora_r", "8",
            "--lora_alpha", "16"]
    launch(3, "distill", [*args, "--per_device_train_batch_size", "2"], tmp_path / "two")
    alone("distill", [*args, "--per_device_train_batch_size", "4"], tmp_path / "one")
    assert_same_log(tmp_path / "two", tmp_path / "one", ("loss", "grad_norm", "sampled_share", "eval_kl"))
    assert_same_adapter(tmp_path / "two" / "adapter", tmp_path / "one" / "adapter", atol=1e-5)


@pytest.mark.parametrize("zero, value_model", [(2, "adapter"), (3, "shared")])
def test_ppo_equals_one_process(weak_sft, tmp_path, zero, value_model):
    """PPO's value adapter (two backward passes a micro-batch) under ZeRO-2; its shared value function under ZeRO-3,
    where the batch maker's own forwards read the LM head as a tensor (gathered with them as an external
    parameter). ZeRO-3 with the value adapter is refused (below)."""
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join((RECIPES / "data" / "demo_prompts.jsonl").read_text().splitlines(True)[:64]))
    args = ["--init_adapter", weak_sft[0], "--dataset_name_or_path", data, "--answer_eval_dataset", "none",
            "--logging_steps", "1", "--target_kl", "0.01", "--kl_horizon", "100", "--missing_eos_penalty", "1",
            "--max_steps", "4", "--ppo_epochs", "2", "--value_model", value_model]
    launch(zero, "ppo", [*args, "--per_device_train_batch_size", "8"], tmp_path / "two")
    alone("ppo", [*args, "--per_device_train_batch_size", "16"], tmp_path / "one")
    assert_same_log(tmp_path / "two", tmp_path / "one", ("reward", "kl_coef", "loss", "value_loss", "grad_norm"))
    assert max(logged(tmp_path / "one", "reward").values()) > 0
    assert_same_adapter(tmp_path / "two" / "adapter", tmp_path / "one" / "adapter", atol=1e-5)
    if value_model == "adapter":
        assert_same_adapter(tmp_path / "two" / "adapter_value", tmp_path / "one" / "adapter_value", atol=1e-5)


@pytest.mark.parametrize("zero, old, new, recipe, args, message", [
    (2, "", "", "sft", ["--use_4bit", "true"], "DeepSpeed cannot train a bitsandbytes-quantized base"),
    (2, "gradient_accumulation_steps: 1", "gradient_accumulation_steps: 4", "sft", [],
     "pass --gradient_accumulation_steps 4 to the recipe"),
    (2, "gradient_clipping: 1.0", "gradient_clipping: 0.5", "sft", [],
     "clips gradients at 0.5, the recipe at --max_grad_norm"),
    (2, "offload_optimizer_device: none", "offload_optimizer_device: cpu", "sft", [],
     "offload_optimizer_device cpu offloads from a GPU"),
    (3, "", "", "ppo", ["--value_model", "adapter"], "PPO's value adapter"),
])
def test_a_launch_deepspeed_cannot_serve_is_one_clear_error(sft_data, tmp_path, tiny_dir, zero, old, new, recipe, args,
                                                           message):
    config = tmp_path / "zero.yaml"
    config.write_text((CONFIGS / f"accelerate_zero{zero}.yaml").read_text().replace(old, new))
    recipe_args = sft_args(sft_data, 2, "--max_steps", "2") if recipe == "sft" else ["--max_steps", "2"]
    proc = launch(zero, recipe, [*recipe_args, *args], tmp_path / "out", config=config, check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors and message in errors[0] and set(errors) == {errors[0]}, proc.stderr[-2000:]
    assert "Loading weights" not in proc.stderr
