"""recipes/rlaif.py with an API judge (a scripted 127.0.0.1 endpoint that prefers the right reversal): a run killed
and resumed repeats no answered judge call and ends as an uninterrupted one; GRPO mode runs on the judge's scores;
a failing judge ends in one clear error naming the URL; the judge reward's arithmetic."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DEMO_PROMPTS, RECIPES, ChatServer, chat_answer, logged, sigkill_when, start_server

from minift.train.judges import JudgeReward

ROOT = Path(__file__).resolve().parents[1]
RLAIF = RECIPES / "rlaif.py"
QUESTION = re.compile(r"Question:\n.*?: (.*?)\n\nAnswer A:\n(.*?)\n\nAnswer B:\n(.*?)\n\n", re.S)


def verdict(body: dict) -> dict:
    """Prefer the right reversal of the prompt's words (P .95); equal merit: P .5 each."""
    words, a, b = QUESTION.search(body["messages"][-1]["content"]).groups()
    right = " ".join(reversed(words.split()))
    margin = (a.strip() == right) - (b.strip() == right)
    p_a = {1: 0.95, 0: 0.5, -1: 0.05}[margin]
    return chat_answer("A" if p_a >= 0.5 else "B", top={"A": p_a, "B": 1 - p_a})


class Judge:
    """A stand-in judge: P(first better) from a table of answers."""

    def __init__(self, table):
        self.table, self.asked = table, []

    def compare(self, prompts, first, second):
        self.asked += list(zip(first, second))
        return [self.table[(a, b)] for a, b in zip(first, second)]


def test_judge_reward_is_each_completions_mean_chance_of_winning():
    # one prompt, 3 completions x, y, z: P(x > y) .8, P(x > z) .6, P(y > z) .3
    judge = Judge({("x", "y"): 0.8, ("x", "z"): 0.6, ("y", "z"): 0.3})
    scores = JudgeReward(judge, 3)(["p"] * 3, ["x", "y", "z"])
    assert scores == pytest.approx([(0.8 + 0.6) / 2, (0.2 + 0.3) / 2, (0.4 + 0.7) / 2])
    assert judge.asked == [("x", "y"), ("x", "z"), ("y", "z")]  # each pair once (the judge asks both orders)
    with pytest.raises(ValueError, match="at least 2"):
        JudgeReward(judge, 1)


def prompts_file(tmp_path: Path, n: int) -> Path:
    path = tmp_path / f"prompts{n}.jsonl"
    path.write_text("".join(DEMO_PROMPTS.read_text().splitlines(keepends=True)[:n]))
    return path


def quick(tmp_path: Path, url: str, *extra) -> list:
    """6 steps of 4 prompts x 2 completions on 64 demo prompts, without the held-out evaluation."""
    return ["--dataset_name_or_path", prompts_file(tmp_path, 64), "--answer_eval_dataset", "none",
            "--judge_api_base", url, "--judge_model", "rules", "--max_steps", "6", "--per_device_train_batch_size", "8",
            "--logging_steps", "1", "--judge_max_retries", "2", *extra]


def run_rlaif(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RLAIF), *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_rpo_adds_the_chosen_completions_nll(weak_sft, tmp_path):
    """``--dpo_rpo_alpha 1``: the first step's loss is DPO's log 2 (the policy is still its reference) plus the chosen
    completions' mean NLL per token, positive; without it, log 2 alone. The share of tied prompts is logged."""
    judge = ChatServer(verdict)
    try:
        for alpha in ("0", "1"):
            proc = run_rlaif(*quick(tmp_path, judge.url, "--init_adapter", weak_sft[0], "--max_steps", "1",
                                    "--dpo_rpo_alpha", alpha), "--output_dir", tmp_path / alpha)
            assert proc.returncode == 0, proc.stderr[-3000:]
    finally:
        judge.close()
    plain, rpo = logged(tmp_path / "0")[1], logged(tmp_path / "1")[1]
    assert plain == pytest.approx(math.log(2), abs=1e-5)
    assert rpo - plain > 0.05, (plain, rpo)  # the same samples (same seed): the difference is the NLL term
    assert 0 <= logged(tmp_path / "1", "tied")[1] < 1


@pytest.mark.slow
def test_a_killed_run_resumes_without_repeating_an_answered_judge_call(weak_sft, tmp_path):
    """The judge holds every question once checkpoint-3 exists (the killed run's step 4 gets no answer); the run is
    killed then and resumed: it asks only what it never got answered, and ends as an uninterrupted run does."""
    marker = tmp_path / "out" / "checkpoint-3" / "trainer_state.json"
    judge = ChatServer(verdict, hold=marker.exists)
    args = [*quick(tmp_path, judge.url, "--init_adapter", weak_sft[0], "--save_steps", "3")]
    try:
        victim = subprocess.Popen([sys.executable, str(RLAIF), *map(str, args), "--output_dir", str(tmp_path / "out")],
                                  cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        sigkill_when(victim, marker)
        judge.hold = lambda: False  # the held questions are dropped unanswered
        judge.gate.set()
        resumed = run_rlaif(*args, "--output_dir", tmp_path / "out", "--resume_from_checkpoint", "auto")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        asked = list(judge.bodies)
        whole = run_rlaif(*args, "--output_dir", tmp_path / "whole")
        assert whole.returncode == 0, whole.stderr[-3000:]
    finally:
        judge.close()
    # killed + resumed: each question answered once (the client caches answers), the same questions as a whole run
    assert len(set(asked)) == len(asked) and sorted(asked) == sorted(judge.bodies[len(asked):])
    assert logged(tmp_path / "out", "loss") == pytest.approx(logged(tmp_path / "whole", "loss"), abs=1e-6)


def test_grpo_mode_and_a_failing_judge(weak_sft, tmp_path):
    judge = ChatServer(verdict)
    try:
        proc = run_rlaif(*quick(tmp_path, judge.url, "--init_adapter", weak_sft[0], "--mode", "grpo", "--max_steps",
                                "2"), "--output_dir", tmp_path / "grpo")
        assert proc.returncode == 0, proc.stderr[-3000:]
    finally:
        judge.close()
    # 2 steps x 4 prompts x 1 pair x 2 orders, less the questions asked twice (identical completions): sent once
    assert len(set(judge.bodies)) == judge.answered <= 2 * 4 * 1 * 2
    assert set(logged(tmp_path / "grpo", "rewards/judge/mean")) == {1, 2}
    broken = ChatServer(verdict, plan=[500] * 100)
    try:
        proc = run_rlaif(*quick(tmp_path, broken.url), "--output_dir", tmp_path / "bad")
    finally:
        broken.close()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"error: reward judge raised APIError: {broken.url}/chat/completions: HTTP 500: boom; gave up after 3 " \
           "attempts" in proc.stderr


def test_grpo_mode_samples_through_a_rollout_server(weak_sft, tmp_path):
    """``--mode grpo --rollout_backend server``: tools/serve.py samples the completions the judge scores, the same
    ones (and so the same judge rewards) as the recipe's own sampler."""
    judge, (server, url) = ChatServer(verdict), start_server("tiny", "--max_batch_size", "128")
    try:
        args = quick(tmp_path, judge.url, "--init_adapter", weak_sft[0], "--mode", "grpo", "--max_steps", "2")
        local = run_rlaif(*args, "--output_dir", tmp_path / "local")
        remote = run_rlaif(*args, "--output_dir", tmp_path / "remote", "--rollout_backend", "server", "--rollout_url",
                           url, "--rollout_model", "tiny")
    finally:
        judge.close()
        server.kill()
        server.wait()
    assert local.returncode == 0 and remote.returncode == 0, (local.stderr[-2000:], remote.stderr[-2000:])
    assert logged(tmp_path / "remote", "rewards/judge/mean") == logged(tmp_path / "local", "rewards/judge/mean")
    assert max(logged(tmp_path / "remote", "sampler_mismatch").values()) < 1e-4
