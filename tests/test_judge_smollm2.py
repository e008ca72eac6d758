"""The demo's judge: SmolLM2-135M-Instruct with the LoRA adapter shipped in recipes/data/judge_smollm2/ (written by
``minift sft --config recipes/configs/judge_smollm2.yaml``, about 12 minutes on 2 cores, too long to train in every
run), scored on the held-out pairs of recipes/data/demo_eval_pairs.jsonl, asked in both orders, locally and through
tools/serve.py."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from conftest import ROOT, start_server
from safetensors import safe_open

from minift.infer.client import ChatClient
from minift.model.load import load_tokenizer
from minift.train.judges import APIJudge, LocalJudge, pair_accuracy
from minift.train.teacher import load_teacher

pytestmark = [pytest.mark.real, pytest.mark.slow]

JUDGE = ROOT / "recipes" / "data" / "judge_smollm2"
CONFIG = ROOT / "recipes" / "configs" / "judge_smollm2.yaml"
PAIRS = [json.loads(line) for line in (ROOT / "recipes" / "data" / "demo_eval_pairs.jsonl").read_text().splitlines()]


def local_judge(model_dir, adapters: list[str]) -> LocalJudge:
    tokenizer = load_tokenizer(str(model_dir))
    return LocalJudge(load_teacher(str(model_dir), tokenizer, adapters=adapters), tokenizer)


@pytest.fixture(scope="module")
def judged(smollm2_dir):
    """The shipped judge's accuracy on the 100 held-out pairs and its P(chosen is better) per pair."""
    started = time.monotonic()
    accuracy, p_chosen = pair_accuracy(local_judge(smollm2_dir, [str(JUDGE)]), PAIRS)
    print(f"judge: {accuracy:.0%} of {len(PAIRS)} held-out pairs in {time.monotonic() - started:.0f} s")
    return accuracy, p_chosen


def test_the_shipped_judge_agrees_with_the_truth(smollm2_dir, judged):
    """>= 85% of held-out pairs (measured: 98%); the base model without the adapter, asked the same, does not
    (measured: 20%), so the agreement is the adapter's."""
    accuracy, _ = judged
    assert accuracy >= 0.85
    base_accuracy, _ = pair_accuracy(local_judge(smollm2_dir, []), PAIRS[:50])
    assert base_accuracy < 0.6


def test_the_served_judge_gives_the_same_verdicts(judged):
    """tools/serve.py with the adapter as a named model, asked through APIJudge (top log-probs of the first token):
    the same probabilities as the local judge on 30 pairs."""
    proc, url = start_server("smollm2", "--adapter", f"judge={JUDGE}")
    try:
        judge = APIJudge(ChatClient(url, "judge", api_key_env=None, timeout=120, max_retries=0))
        _, p_chosen = pair_accuracy(judge, PAIRS[:30])
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert p_chosen == pytest.approx(judged[1][:30], abs=0.01)


def test_the_committed_command_writes_an_adapter_like_the_shipped_one(tmp_path):
    """The config the shipped adapter came from, rerun for 2 steps: the same LoRA settings and the same tensors."""
    done = subprocess.run([sys.executable, "-m", "minift", "sft", "--config", str(CONFIG), "--max_steps", "2",
                           "--save_steps", "0", "--output_dir", str(tmp_path / "judge")], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    fresh, shipped = tmp_path / "judge" / "adapter", JUDGE
    keys = ("r", "lora_alpha", "target_modules", "base_model_name_or_path")
    settings = [{k: json.loads((d / "adapter_config.json").read_text())[k] for k in keys} for d in (fresh, shipped)]
    assert settings[0] == settings[1]

    def shapes(d):
        with safe_open(str(d / "adapter_model.safetensors"), "pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}

    assert shapes(fresh) == shapes(shipped)
