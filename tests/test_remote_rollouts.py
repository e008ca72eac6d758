"""Rollouts from an inference server (``--rollout_backend server``, minift.train.remote) with tools/serve.py in its
own process: synchronous, they are the local rollouts (GRPO, PPO); one step off (async), GRPO learns from them; an
async run killed at a random moment and resumed equals the uninterrupted one and asks the server nothing twice; a server that dies ends the run with one
error naming the URL and the checkpoint to resume from; an adapter the server refuses stops the run before it
trains."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import DEMO_PROMPTS, assert_same_adapter, logged, start_server

from minift.infer.client import ChatClient
from minift.lora.adapters import load_adapter
from minift.model.load import load_model_and_tokenizer
from minift.train.remote import tis_weights
from minift.train.sampling import SamplingParams, sample

ROOT = Path(__file__).resolve().parents[1]
GRPO = ROOT / "recipes" / "grpo.py"
SERVE = ("--max_batch_size", "128", "--batch_wait_ms", "20")
# tools/serve.py, each completions request written down (adapter name, seed) as it arrives
COUNTING = ("import json, runpy, sys\n"
            "from minift.infer import server\n"
            "log, submit = open(sys.argv.pop(1), 'a', buffering=1), server.Batcher.submit\n"
            "def counted(self, request):\n"
            "    log.write(json.dumps([request.model, request.params.seed]) + '\\n')\n"
            "    return submit(self, request)\n"
            "server.Batcher.submit = counted\n"
            "sys.argv[0] = 'tools/serve.py'\n"
            "runpy.run_path('tools/serve.py', run_name='__main__')\n")


def one_thread() -> dict:
    """Trainer and server share 2 cores: one OpenMP thread each, or their spinning teams thrash when they overlap."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def grpo(*args, log: Path) -> subprocess.Popen:
    """recipes/grpo.py in the background, its stderr into ``log`` (a pipe nobody reads could fill and stall it)."""
    with log.open("w") as stderr:
        return subprocess.Popen([sys.executable, str(GRPO), *map(str, args)], cwd=ROOT, env=one_thread(),
                                stdout=subprocess.DEVNULL, stderr=stderr)


def run(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(GRPO), *map(str, args)], cwd=ROOT, env=one_thread(),
                          capture_output=True, text=True, timeout=timeout)


def remote(url: str) -> list[str]:
    return ["--rollout_backend", "server", "--rollout_url", url, "--rollout_model", "tiny"]


def small_run(weak_sft, tmp_path) -> list[str]:
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(DEMO_PROMPTS.read_text().splitlines(keepends=True)[:64]))
    return ["--init_adapter", weak_sft[0], "--dataset_name_or_path", data, "--answer_eval_dataset", "none",
            "--logging_steps", "1", "--num_generations", "4", "--per_device_train_batch_size", "16",
            "--learning_rate", "1e-3", "--beta", "0.05", "--epsilon_high", "0.28", "--save_steps", "4",
            "--max_steps", "12"]


def served(log: Path) -> list[tuple[str, int]]:
    """(adapter version, seed) of every completions request the counting server received, in order."""
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    return [(model.rsplit("-", 1)[1], seed) for model, seed in rows]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_server_reports_every_sampled_token_by_id_with_the_engines_log_probs(weak_sft, tiny_dir):
    """``return_tokens_as_token_ids`` (vLLM's extension): each completion's tokens as ``token_id:N``, the final EOS
    included, with the log-probs minift's own sampler gives for the same seed."""
    proc, url = start_server("tiny", "--adapter", f"sft={weak_sft[0]}", env=one_thread())
    model, tokenizer = load_model_and_tokenizer(str(tiny_dir), dtype="float32")
    load_adapter(model, weak_sft[0])
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Reverse the words: cup apple lemon"}],
                                           add_generation_prompt=True, tokenize=False)
    prompt = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    try:
        answer = ChatClient(url, "sft").complete(prompt, n=4, max_tokens=12, temperature=1.0, seed=11, logprobs=0,
                                                 return_tokens_as_token_ids=True)
    finally:
        proc.kill()
        proc.wait()
    local = sample(model, tokenizer, [prompt], SamplingParams(max_new_tokens=12, temperature=1.0, seed=11), n=4)
    ended = 0
    for choice, mine in zip(answer["choices"], local):
        ids = [int(t.split(":")[1]) for t in choice["logprobs"]["tokens"]]
        assert ids == mine.token_ids and choice["finish_reason"] == mine.finish_reason
        assert choice["logprobs"]["token_logprobs"] == pytest.approx(mine.logprobs, abs=1e-4)
        ended += ids[-1] == tokenizer.eos_token_id
    assert ended  # an EOS was sampled and reported


def test_tis_weights_cap_the_trainer_to_sampler_ratio():
    logps = torch.tensor([[-1.0, -2.0, -0.5, 0.0]])
    sampler = torch.tensor([[-1.0, -3.0, -0.4, 9.0]])  # the last position is not a completion token
    mask = torch.tensor([[True, True, True, False]])
    weights, stats = tis_weights(logps, sampler, mask, cap=2.0)
    assert weights[0, :3].tolist() == pytest.approx([1.0, 2.0, torch.tensor(-0.1).exp().item()])
    assert stats["sampler_mismatch"].item() == pytest.approx((0 + 1 + 0.1) / 3)
    assert stats["tis_capped"].item() == pytest.approx(1 / 3)


@pytest.mark.slow
def test_synchronous_server_rollouts_are_the_local_ones(weak_sft, tmp_path):
    """Through tools/serve.py the trainer gets the completions its own sampler draws (same seeds): the same rewards
    at every step, a sampler mismatch at rounding level (the server's combined adapter vs the trainer's chain folded
    into its weights), and the local run's adapter. That rounding can flip a sampled token where a draw lands on a
    boundary of the CDF: one did at step 8 of 12 when the KV cache's layout changed, and the adapters then differed
    by 1.6e-4 (1e-6 before the flip), hence 1e-3; sampling from a stale or wrong adapter changes the rewards."""
    args = [*small_run(weak_sft, tmp_path), "--save_steps", "0"]
    proc, url = start_server("tiny", *SERVE)
    try:
        served_run = run(*args, *remote(url), "--output_dir", tmp_path / "server")
    finally:
        proc.kill()
        proc.wait()
    local = run(*args, "--output_dir", tmp_path / "local")
    assert served_run.returncode == 0 and local.returncode == 0, (served_run.stderr[-3000:], local.stderr[-3000:])
    assert logged(tmp_path / "server", "reward") == logged(tmp_path / "local", "reward")
    assert max(logged(tmp_path / "server", "sampler_mismatch").values()) < 1e-4
    assert_same_adapter(tmp_path / "server" / "adapter", tmp_path / "local" / "adapter", atol=1e-3)


@pytest.mark.slow
def test_two_processes_sample_through_the_server_as_one(weak_sft, tmp_path):
    """torchrun with 2 processes x 8 completions, each asking the server for its own prompts one step ahead (the main
    process gives the server the adapter, the other waits for it), trains the adapter of 1 process x 16. With
    ``--rollout_sync_steps 3`` the server's adapter is 0, 1, 2 steps behind in turn."""
    args = [*small_run(weak_sft, tmp_path), "--save_steps", "0", "--max_steps", "6", "--async_rollouts"]
    proc, url = start_server("tiny", *SERVE, env=one_thread())
    try:
        two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              str(GRPO), *map(str, args), *remote(url), "--per_device_train_batch_size", "8",
                              "--output_dir", str(tmp_path / "two")], cwd=ROOT, capture_output=True, text=True,
                             timeout=300, env=one_thread())
        one = run(*args, *remote(url), "--output_dir", tmp_path / "one")
        every3 = run(*[a for a in args if a != "--async_rollouts"], *remote(url), "--rollout_sync_steps", "3",
                     "--output_dir", tmp_path / "every3")
    finally:
        proc.kill()
        proc.wait()
    assert two.returncode == 0 and one.returncode == 0 and every3.returncode == 0, \
        (two.stderr[-3000:], one.stderr[-3000:], every3.stderr[-3000:])
    for key in ("reward", "staleness", "loss"):
        a, b = logged(tmp_path / "two", key), logged(tmp_path / "one", key)
        assert all(a[s] == pytest.approx(b[s], abs=1e-5) for s in range(1, 7)), (key, a, b)
    assert_same_adapter(tmp_path / "two" / "adapter", tmp_path / "one" / "adapter", atol=1e-5)
    assert list(logged(tmp_path / "every3", "staleness").values()) == [0.0, 1.0, 2.0] * 2


@pytest.mark.slow
def test_ppo_samples_through_the_server_as_it_does_itself(weak_sft, tmp_path):
    """PPO with server rollouts: the same completions (rewards) as its own sampler draws, the importance weights
    at 1 up to rounding, and async too (staleness 1)."""
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(DEMO_PROMPTS.read_text().splitlines(keepends=True)[:64]))
    args = [sys.executable, str(ROOT / "recipes" / "ppo.py"), "--init_adapter", str(weak_sft[0]),
            "--dataset_name_or_path", str(data), "--answer_eval_dataset", "none", "--logging_steps", "1",
            "--per_device_train_batch_size", "16", "--ppo_epochs", "1", "--max_steps", "4", "--save_steps", "0"]
    proc, url = start_server("tiny", *SERVE, env=one_thread())
    try:
        runs = {name: subprocess.run([*args, *flags, "--output_dir", str(tmp_path / name)], cwd=ROOT,
                                     capture_output=True, text=True, timeout=300, env=one_thread())
                for name, flags in [("local", []), ("server", remote(url)), ("async", [*remote(url),
                                                                                      "--async_rollouts"])]}
    finally:
        proc.kill()
        proc.wait()
    assert all(r.returncode == 0 for r in runs.values()), {k: r.stderr[-2000:] for k, r in runs.items()}
    assert logged(tmp_path / "server", "reward") == logged(tmp_path / "local", "reward")
    assert max(logged(tmp_path / "server", "sampler_mismatch").values()) < 1e-4
    assert set(logged(tmp_path / "async", "staleness").values()) == {0.0, 1.0}  # the first batch has none


@pytest.mark.slow
def test_grpo_learns_from_async_server_rollouts(weak_sft, tmp_path):
    """From the weak start, GRPO with the recipe's defaults sampling one step ahead through tools/serve.py (its own
    process) raises held-out exact match by the local run's bar, 20 points (measured: 44% -> 70%, 9.5 to 10.5
    minutes here); the policy that sampled is one update behind (staleness 1) and the importance weights see a small
    mismatch (mean |Δ log-prob| 0.005 median, 0.025 at most). The synchronous backend is the local run's own
    sampling (test_synchronous_server_rollouts_are_the_local_ones), whose learning test_grpo.py shows."""
    adapter, before = weak_sft
    proc, url = start_server("tiny", *SERVE, env=one_thread())
    try:
        result = run("--init_adapter", adapter, "--output_dir", tmp_path, "--logging_steps", "50", *remote(url),
                     "--async_rollouts", timeout=1500)
    finally:
        proc.kill()
        proc.wait()
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "run.json").read_text())["metrics"]
    assert record["answer_accuracy_before"] == pytest.approx(before)
    assert record["answer_accuracy"] >= before + 0.20, record
    mismatch, staleness = logged(tmp_path, "sampler_mismatch"), logged(tmp_path, "staleness")
    assert max(mismatch.values()) < 0.1, mismatch
    assert set(staleness.values()) == {1.0}, staleness
    rewards = list(logged(tmp_path, "reward").values())
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.1, rewards  # the sampled completions' reward rose too
    assert not (tmp_path / "rollouts").exists() and not (tmp_path / "rollout_adapters").exists()


@pytest.mark.slow
def test_async_run_killed_at_a_random_moment_resumes_exactly_asking_nothing_twice(weak_sft, tmp_path):
    """SIGKILLed at a random moment after checkpoint-4 and resumed, an async run ends with the uninterrupted run's
    adapter; the server was asked for the same rollouts, each once, but for those in flight at the kill."""
    args = [*small_run(weak_sft, tmp_path), "--async_rollouts"]
    delay = random.Random().uniform(0.0, 0.5)
    logs = {name: tmp_path / f"{name}.jsonl" for name in ("whole", "killed")}
    runs = {}
    for name, log in logs.items():
        proc, url = start_server("tiny", *SERVE, program=(sys.executable, "-c", COUNTING, str(log)), env=one_thread())
        try:
            out = tmp_path / name
            if name == "killed":
                victim = grpo(*args, *remote(url), "--output_dir", out, log=tmp_path / "victim.log")
                while not (out / "checkpoint-4" / "trainer_state.json").exists():
                    assert victim.poll() is None, (tmp_path / "victim.log").read_text()[-3000:]
                    time.sleep(0.005)
                time.sleep(delay)
                assert victim.poll() is None, f"the run ended within {delay:.2f} s of checkpoint-4"
                os.kill(victim.pid, signal.SIGKILL)
                victim.wait()
                args_resume = ["--resume_from_checkpoint", "auto"]
            else:
                args_resume = []
            runs[name] = run(*args, *remote(url), "--output_dir", out, *args_resume)
        finally:
            proc.kill()
            proc.wait()
        assert runs[name].returncode == 0, (name, runs[name].stderr[-3000:])
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert_same_adapter(killed / "adapter", whole / "adapter", atol=1e-6)
    assert logged(killed, "reward") == pytest.approx(logged(whole, "reward"), abs=1e-6)
    asked, asked_killed = served(logs["whole"]), served(logs["killed"])
    assert len(asked) == len(set(asked)) == 12 * 4, "each micro-batch's 4 prompts asked once"
    assert set(asked_killed) == set(asked), f"delay {delay:.2f} s"
    assert len(asked_killed) - len(asked) <= 4, f"more than one micro-batch asked twice (delay {delay:.2f} s)"


@pytest.mark.slow
def test_a_server_that_dies_ends_the_run_with_one_error_and_a_restart_resumes(weak_sft, tmp_path):
    """The server killed mid-run: the client retries, then one ``error:`` line names the URL and the last good
    checkpoint; with the server started again on its port, ``--resume_from_checkpoint auto`` finishes the run."""
    port, out = free_port(), tmp_path / "out"
    args = [*small_run(weak_sft, tmp_path), "--async_rollouts", "--output_dir", out]
    proc, url = start_server("tiny", *SERVE, port=port, env=one_thread())
    try:
        trainer = grpo(*args, *remote(url), log=tmp_path / "trainer.log")
        while not (out / "checkpoint-4" / "trainer_state.json").exists():
            assert trainer.poll() is None, (tmp_path / "trainer.log").read_text()[-3000:]
            time.sleep(0.005)
    finally:
        proc.kill()
        proc.wait()
    trainer.wait(timeout=120)
    stderr = (tmp_path / "trainer.log").read_text()
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert trainer.returncode == 1 and len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert f"127.0.0.1:{port}/v1" in errors[0] and "gave up after" in errors[0], errors
    assert f"the last good checkpoint is {out}/checkpoint-" in errors[0] and "--resume_from_checkpoint" in errors[0]
    proc, url = start_server("tiny", *SERVE, port=port, env=one_thread())
    try:
        resumed = run(*args, *remote(url), "--resume_from_checkpoint", "auto")
    finally:
        proc.kill()
        proc.wait()
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(logged(out, "reward")) == list(range(1, 13))


def test_an_adapter_the_server_refuses_stops_the_run_before_training(gpt2_dir, tmp_path):
    """A server serving another base model refuses the policy's adapter: one error, before any step."""
    proc, url = start_server(str(gpt2_dir), env=one_thread())
    try:
        result = run("--output_dir", tmp_path / "out", "--answer_eval_dataset", "none", "--max_steps", "2",
                     *remote(url))
    finally:
        proc.kill()
        proc.wait()
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "load_lora_adapter" in error[0] and "HTTP 400" in error[0], error
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


SERVER = ["--rollout_backend", "server", "--rollout_url", "http://127.0.0.1:9/v1", "--rollout_model", "m"]


@pytest.mark.parametrize("recipe, args, message", [
    ("grpo", ["--rollout_backend", "server"], "needs --rollout_url"),
    ("grpo", [*SERVER, "--lora_r", "0"], "train one (lora_r > 0)"),
    ("grpo", ["--async_rollouts"], "async_rollouts needs rollout_backend server"),
    ("grpo", ["--rollout_backend", "vllm"], "rollout_backend must be local or server"),
    ("rlaif", [*SERVER, "--judge_api_base", "http://127.0.0.1:9/v1", "--judge_model", "j"],
     "use it with --mode grpo")])
def test_remote_options_are_checked_before_anything_loads(tmp_path, recipe, args, message):
    result = subprocess.run([sys.executable, str(ROOT / "recipes" / f"{recipe}.py"), *args, "--output_dir",
                             str(tmp_path / "out"), "--dry_run"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
