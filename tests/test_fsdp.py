"""FSDP (version 2) across 2 CPU processes, launched as users launch it: ``accelerate launch --config_file
recipes/configs/accelerate_fsdp_cpu.yaml RECIPE``. Accelerate ignores FSDP on CPU processes, so minift shards
(minift/train/sharding.py); each run here equals 1 process with twice the batch: SFT with LoRA and in full, DPO
with the reference as the adapter switched off, GRPO, and on-policy distillation from a teacher outside the
sharded module. A sharded full fine-tune killed after a checkpoint resumes to the uninterrupted run's weights.
A launch FSDP cannot serve here (or a GPU launch on this machine) fails before any weights load, with one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_same_adapter, logged, sigkill_when
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
FSDP_CPU = RECIPES / "configs" / "accelerate_fsdp_cpu.yaml"
SHARDED = "FSDP: 2 LlamaDecoderLayer blocks and the root sharded over 2 CPU processes"


def launch(recipe: str, args: list, out: Path, *, config: Path = FSDP_CPU,
           check: bool = True) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file CONFIG recipes/RECIPE.py ARGS --output_dir OUT``."""
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                           str(RECIPES / f"{recipe}.py"), *map(str, args), "--output_dir", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert SHARDED in proc.stderr
    return proc


def alone(recipe: str, args: list, out: Path) -> None:
    proc = subprocess.run([sys.executable, str(RECIPES / f"{recipe}.py"), *map(str, args), "--output_dir", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def assert_same_log(a: Path, b: Path, keys: tuple[str, ...], atol: float = 1e-5) -> None:
    """Each metric logged at the same steps, equal within ``atol`` or 1e-5 of its size (float summation order)."""
    for key in keys:
        x, y = logged(a, key), logged(b, key)
        assert x and x.keys() == y.keys(), key
        assert all(x[s] == pytest.approx(y[s], rel=1e-5, abs=atol) for s in x), (key, x, y)


def model_weights(directory: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("fsdp-data") / "sft.jsonl"
    path.write_text("".join((RECIPES / "data" / "demo_sft.jsonl").read_text().splitlines(True)[:64]))
    return path


def sft_args(data: Path, batch: int, *extra, eval_batch: int = 2) -> list:
    return ["--dataset_name_or_path", data, "--max_seq_length", "64", "--validation_split", "0.2",
            "--per_device_eval_batch_size", eval_batch, "--answer_eval_dataset", "none", "--logging_steps", "1",
            "--per_device_train_batch_size", batch, *extra]


def test_sft_lora_sharded_equals_one_process(sft_data, tmp_path, tiny_dir):
    """2 sharded processes x batch 2 == 1 process x batch 4: losses, gradient norms, evaluation, the adapter; the
    merged model written from it equals the one process's. The 8 held-out rows make one eval batch: the second
    process has none of its own and still takes part."""
    extra = ["--lora_r", "16", "--lora_alpha", "32", "--max_steps", "6", "--merge_output", "true"]
    launch("sft", sft_args(sft_data, 2, *extra, eval_batch=8), tmp_path / "two")
    alone("sft", sft_args(sft_data, 4, *extra, eval_batch=8), tmp_path / "one")
    assert_same_log(tmp_path / "two", tmp_path / "one", ("loss", "grad_norm", "eval_loss"))
    assert_same_adapter(tmp_path / "two" / "adapter", tmp_path / "one" / "adapter", atol=1e-5)
    merged = [model_weights(tmp_path / run / "merged") for run in ("two", "one")]
    assert merged[0].keys() == merged[1].keys()
    assert max((merged[0][k] - merged[1][k]).abs().max().item() for k in merged[0]) <= 1e-5


def test_sft_full_sharded_equals_one_process_and_resumes_after_sigkill(sft_data, tmp_path, tiny_dir):
    """A sharded full fine-tune (every weight and its optimizer state sharded) == 1 process; killed (every
    process of the launch at once, as when a node dies) after checkpoint-4 and resumed, it ends with the
    uninterrupted sharded run's weights. Checkpoints hold the optimizer state gathered whole, keyed by name."""
    extra = ["--lora_r", "0", "--learning_rate", "1e-4", "--max_steps", "12", "--save_steps", "4",
             "--max_seq_length", "128"]
    args = sft_args(sft_data, 2, *extra)
    launch("sft", args, tmp_path / "two")
    alone("sft", sft_args(sft_data, 4, *extra), tmp_path / "one")
    two, one = model_weights(tmp_path / "two" / "model"), model_weights(tmp_path / "one" / "model")
    assert two.keys() == one.keys()
    assert max((two[k] - one[k]).abs().max().item() for k in two) <= 1e-5
    state = torch.load(tmp_path / "two" / "checkpoint-4" / "optimizer.pt", weights_only=True)["state"]
    assert "model.embed_tokens.weight" in state and state["model.embed_tokens.weight"]["exp_avg"].shape == \
        one["model.embed_tokens.weight"].shape  # whole, not one process's shard

    killed = tmp_path / "killed"
    victim = subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CPU),
                               str(RECIPES / "sft.py"), *map(str, args), "--output_dir", str(killed)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    sigkill_when(victim, killed / "checkpoint-4" / "trainer_state.json", group=True)
    assert not (killed / "model").exists(), "the run finished before SIGKILL landed"
    resumed = launch("sft", [*args, "--resume_from_checkpoint", "auto"], killed)
    assert "resumed from" in resumed.stderr
    again = model_weights(killed / "model")
    assert max((again[k] - two[k]).abs().max().item() for k in two) <= 1e-6
    assert [json.loads(x)["step"] for x in (killed / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(x)] == list(range(1, 13))


def test_dpo_sharded_with_the_adapter_off_as_reference_equals_one_process(tmp_path, tiny_dir):
    """The 12 held-out pairs make one eval batch: the second process evaluates nothing of its own."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join((RECIPES / "data" / "demo_preference.jsonl").read_text().splitlines(True)[:48]))
    args = ["--dataset_name_or_path", data, "--max_seq_length", "64", "--validation_split", "0.25",
            "--answer_eval_dataset", "none", "--logging_steps", "1", "--max_steps", "5", "--learning_rate", "3e-3",
            "--precompute_ref_log_probs", "false", "--per_device_eval_batch_size", "12", "--lora_r", "16",
            "--lora_alpha", "32"]
    launch("dpo", [*args, "--per_device_train_batch_size", "2"], tmp_path / "two")
    alone("dpo", [*args, "--per_device_train_batch_size", "4"], tmp_path / "one")
    assert_same_log(tmp_path / "two", tmp_path / "one", ("loss", "rewards/margins", "grad_norm", "eval_loss"))
    assert_same_adapter(tmp_path / "two" / "adapter", tmp_path / "one" / "adapter", atol=1e-5)


def test_grpo_sharded_equals_one_process(weak_sft, tmp_path):
    """Each process samples its own rollouts with the model gathered whole, then trains sharded."""
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join((RECIPES / "data" / "demo_prompts.jsonl").read_text().splitlines(True)[:64]))
    args = ["--init_adapter", weak_sft[0], "--dataset_name_or_path", data, "--answer_eval_dataset", "none",
            "--max_steps", "6", "--logging_steps", "1", "--num_generations", "4", "--learning_rate", "1e-3",
            "--beta", "0.05"]
    launch("grpo", [*args, "--per_device_train_batch_size", "8"], tmp_path / "two")
    alone("grpo", [*args, "--per_device_train_batch_size", "16"], tmp_path / "one")
    assert_same_log(tmp_path / "two", tmp_path / "one", ("reward", "completion_length", "kl", "loss"))
    assert max(logged(tmp_path / "one", "reward").values()) > 0  # the rollouts were informative
    assert_same_adapter(tmp_path / "two" / "adapter", tmp_path / "one" / "adapter", atol=1e-5)


def test_on_policy_distillation_sharded_with_the_teacher_outside_equals_one_process(sft_data, gpt2_dir, tmp_path):
    """A GPT-2 teacher (its own model, whole on every process; its head beside the sharded student) and half
    the completions sampled by the student: each process samples a different number, with the student whole."""
    args = ["--teacher_model_name_or_path", gpt2_dir, "--mode", "on_policy", "--lmbda", "0.5",
            "--max_completion_length", "8", *sft_args(sft_data, 2)[:-2], "--max_steps", "4", "--lora_r", "8",
            "--lora_alpha", "16"]
    launch("distill", [*args, "--per_device_train_batch_size", "2"], tmp_path / "two")
    alone("distill", [*args, "--per_device_train_batch_size", "4"], tmp_path / "one")
    assert_same_log(tmp_path / "two", tmp_path / "one", ("loss", "grad_norm", "sampled_share", "eval_kl"))
    assert 0 < logged(tmp_path / "one", "sampled_share")[1] < 1
    assert_same_adapter(tmp_path / "two" / "adapter", tmp_path / "one" / "adapter", atol=1e-5)


@pytest.mark.parametrize("old, new, args, message", [
    ("", "", ["--use_4bit", "true"], "FSDP cannot shard a bitsandbytes-quantized base"),
    ("fsdp_version: 2", "fsdp_version: 1", [], "set fsdp_version: 2"),
    ("TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", [], "fsdp_auto_wrap_policy SIZE_BASED_WRAP is not supported"),
    ("efficient_loading: false", "efficient_loading: true", [], "set fsdp_cpu_ram_efficient_loading: false"),
])
def test_a_launch_fsdp_cannot_serve_is_one_clear_error(sft_data, tmp_path, tiny_dir, old, new, args, message):
    """The processes stop with the same one-line error before any weights load (the launcher may end the second
    process before it prints its line, once the first has failed)."""
    config = tmp_path / "fsdp.yaml"
    config.write_text(FSDP_CPU.read_text().replace(old, new) if old else FSDP_CPU.read_text())
    proc = launch("sft", [*sft_args(sft_data, 2, "--max_steps", "2"), *args], tmp_path / "out", config=config,
                  check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors and message in errors[0] and set(errors) == {errors[0]}, proc.stderr[-2000:]
    assert "Loading weights" not in proc.stderr


def test_a_gpu_launch_on_a_machine_without_one_is_one_clear_error(sft_data, tmp_path, tiny_dir):
    """The shipped GPU config (processes = GPUs) with more processes than this machine has cores, and fp16 (CUDA's
    loss scaling) in one process: each refused with one line before any weights load."""
    cores = len(os.sched_getaffinity(0))
    launch_ = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                              str(RECIPES / "configs" / "accelerate_ddp.yaml"), "--num_processes", str(cores + 1),
                              str(RECIPES / "sft.py"), *map(str, sft_args(sft_data, 2, "--max_steps", "2")),
                              "--output_dir", str(tmp_path / "ddp")], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
    fp16 = subprocess.run([sys.executable, str(RECIPES / "sft.py"), "--mixed_precision", "fp16", "--output_dir",
                           str(tmp_path / "fp16")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    for proc, message in ((launch_, f"starts {cores + 1} processes on a machine with no GPU and {cores} CPU cores"),
                          (fp16, "fp16 mixed precision needs a GPU")):
        assert proc.returncode != 0
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert errors and message in errors[0] and set(errors) == {errors[0]}, proc.stderr[-2000:]
        assert "Loading weights" not in proc.stderr


def test_reward_model_sharded_equals_one_process(tmp_path, tiny_dir):
    """The score head (trained in full beside the adapter, saved with it) sits in the root's shard."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join((RECIPES / "data" / "demo_preference.jsonl").read_text().splitlines(True)[:48]))
    args = ["--dataset_name_or_path", data, "--max_seq_length", "64", "--validation_split", "0.25",
            "--answer_eval_dataset", "none", "--logging_steps", "1", "--max_steps", "4",
            "--per_device_eval_batch_size", "3", "--lora_r", "8", "--lora_alpha", "16"]
    launch("reward_model", [*args, "--per_device_train_batch_size", "2"], tmp_path / "two")
    alone("reward_model", [*args, "--per_device_train_batch_size", "4"], tmp_path / "one")
    assert_same_log(tmp_path / "two", tmp_path / "one", ("loss", "grad_norm", "eval_accuracy"))
    two = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    one = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.score.weight" in two and two.keys() == one.keys()
    assert max((two[k] - one[k]).abs().max().item() for k in two) <= 1e-5
