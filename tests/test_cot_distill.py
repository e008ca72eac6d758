"""recipes/cot_distill.py: a teacher fine-tuned to reason teaches a fresh student (final-answer accuracy up >= 30
points); the API teacher end to end against tools/serve.py (the same rationales as the local teacher; a rerun calls
nothing) and a scripted 127.0.0.1 server (SIGKILL during generation, then a rerun: no answered call repeated;
429 / 500 / silence: retries, then one clear error naming the URL); answers are read and filtered as said."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import RECIPES, ChatServer, _ProcessState, chat_answer, load_recipe, start_server

ROOT = Path(__file__).resolve().parents[1]
COT = RECIPES / "cot_distill.py"
PROMPTS = RECIPES / "data" / "demo_prompts.jsonl"
REASONING = RECIPES / "data" / "demo_reasoning.jsonl"
# small student runs: a few steps, no held-out split
QUICK = ["--max_steps", "2", "--validation_split", "0", "--per_device_train_batch_size", "1", "--logging_steps", "1",
         "--teacher_max_new_tokens", "64", "--answer_eval_dataset", RECIPES / "data" / "demo_eval.jsonl"]


@pytest.fixture(scope="module")
def cot(monkeypatch_session):
    monkeypatch_session.syspath_prepend(str(RECIPES))  # cot_distill.py trains through sft.py
    return load_recipe("cot_distill")


@pytest.fixture(scope="session")
def reasoner(tiny_dir, tmp_path_factory):
    """The teacher: tiny fine-tuned by recipes/sft.py on the bundled worked reversals (demo_reasoning.jsonl)."""
    sft = load_recipe("sft")
    out = tmp_path_factory.mktemp("reasoner")
    with _ProcessState():
        sft.main(sft.SFTConfig(dataset_name_or_path=str(REASONING), output_dir=str(out), num_train_epochs=15.0,
                               validation_split=0.0, answer_eval_dataset=None, logging_steps=0))
    return out / "adapter"


def prompts_file(tmp_path: Path, n: int) -> Path:
    path = tmp_path / f"prompts{n}.jsonl"
    path.write_text("".join(PROMPTS.read_text().splitlines(keepends=True)[:n]))
    return path


def test_final_answers_are_read_as_configured(cot):
    assert cot.final_answer("The last word is b. Answer: b a", cot.CoTConfig.answer_pattern) == "b a"
    assert cot.final_answer("Answer: x\nthen Answer: y z ", r"Answer:\s*(.+?)\s*$") == "y z"  # the last one
    assert cot.final_answer("no verdict here", r"Answer:\s*(.+?)\s*$") is None
    assert cot.final_answer("#### 42", r"#### \d+") == "#### 42"  # no group: the whole match
    cfg = cot.CoTConfig(teacher_model_name_or_path="tiny", multitask=True)
    records, counts = cot.keep_correct(cfg, [{"prompt": "p", "answer": "b a"}] * 3,
                                       [["so Answer: b a"], ["Answer: a b"], ["I do not know"]])
    assert counts == {"kept": 1, "wrong": 1, "unparsable": 1, "teacher_accuracy": 1 / 3}
    assert records == [{"prompt": "[rationale] p", "completion": "so Answer: b a"},
                       {"prompt": "[answer] p", "completion": "b a"}]
    with pytest.raises(ValueError, match="may have one group"):
        cot.CoTConfig(teacher_model_name_or_path="tiny", answer_pattern="(a)(b)")
    with pytest.raises(ValueError, match="not a regular expression"):  # the data section's check, in every recipe
        load_recipe("sft").SFTConfig(answer_pattern="Answer: (")


@pytest.mark.slow
def test_the_student_learns_to_reason_from_the_teacher(cot, reasoner, tmp_path):
    """From the teacher's rationales for 2,000 training prompts (only those reaching the reference kept), a fresh
    student's final-answer accuracy on the 100 held-out demo prompts rises by >= 30 points."""
    with _ProcessState():
        result = cot.main(cot.CoTConfig(teacher_model_name_or_path="tiny", teacher_adapter=[str(reasoner)],
                                        dataset_name_or_path=str(prompts_file(tmp_path, 2000)),
                                        answer_eval_dataset=str(RECIPES / "data" / "demo_eval.jsonl"),
                                        output_dir=str(tmp_path / "out"), teacher_max_new_tokens=64))
    assert result["kept"] + result["wrong"] + result["unparsable"] == 2000 and result["teacher_calls"] == 2000
    assert result["teacher_accuracy"] >= 0.5, result
    assert result["final_answer_accuracy"] >= result["final_answer_accuracy_before"] + 0.30, result


def run_cot(*args, timeout: float = 300, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(COT), *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_api_teacher_through_minift_s_server(reasoner, tiny_dir, tmp_path):
    """tools/serve.py serving the teacher: its greedy rationales are the local teacher's, and a rerun of the run
    (its outputs cached) sends the server no request."""
    data = prompts_file(tmp_path, 24)
    local = run_cot("--teacher_model_name_or_path", "tiny", "--teacher_adapter", reasoner, "--dataset_name_or_path",
                    data, "--output_dir", tmp_path / "local", *QUICK)
    assert local.returncode == 0, local.stderr[-3000:]
    server, url = start_server(str(tiny_dir), "--adapter", f"reasoner={reasoner}", "--log_requests")
    try:
        api = [*QUICK, "--teacher_api_base", url, "--teacher_model", "reasoner", "--dataset_name_or_path", data,
               "--output_dir", tmp_path / "api"]
        first = run_cot(*api)
        assert first.returncode == 0, first.stderr[-3000:]
        again = run_cot(*api, "--overwrite_output_dir", "true")
        assert again.returncode == 0, again.stderr[-3000:]
    finally:
        server.terminate()
        _, log = server.communicate(timeout=60)
    assert log.count("POST /v1/chat/completions") == 24  # the rerun asked nothing
    for proc in (local, first):  # each answer counted on the bar as it arrives, local or from the API
        assert re.search(r"teacher rationales: 100%.* 24/24", proc.stderr), proc.stderr[-2000:]
    assert "teacher rationales" not in again.stderr
    outputs = {name: sorted(json.loads(line)["value"] for line in (tmp_path / name / "teacher_outputs.jsonl").open())
               for name in ("local", "api")}
    assert outputs["api"] == outputs["local"]
    rerun, local = (json.loads((tmp_path / name / "cot_distill.json").read_text()) for name in ("api", "local"))
    assert (rerun["teacher_calls"], rerun["teacher_cached"]) == (0, 24) and rerun["kept"] == local["kept"]


def reverse_rightly(body: dict) -> str:
    """The scripted teacher's rationale: the words of the prompt, reversed right."""
    words = body["messages"][-1]["content"].split(":", 1)[1].split()
    return f"The words are {', '.join(words)}. Answer: {' '.join(reversed(words))}"


def rule_teacher(**options) -> ChatServer:
    return ChatServer(lambda body: chat_answer(reverse_rightly(body)), **options)


def test_a_killed_generation_reruns_without_repeating_an_answered_call(tiny_dir, tmp_path):
    teacher = rule_teacher(hold=lambda: teacher.answered >= 10)
    data = prompts_file(tmp_path, 32)
    args = [*QUICK, "--teacher_api_base", teacher.url, "--teacher_model", "rules", "--dataset_name_or_path", data,
            "--output_dir", tmp_path / "out", "--teacher_timeout", "120"]
    try:
        victim = subprocess.Popen([sys.executable, str(COT), *map(str, args)], cwd=ROOT, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        cache = tmp_path / "out" / "teacher_outputs.jsonl"
        deadline = time.monotonic() + 240
        while not (cache.is_file() and len(cache.read_text().splitlines()) >= 10):
            assert victim.poll() is None and time.monotonic() < deadline, "the run ended or stalled before 10 answers"
            time.sleep(0.05)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=30)
        assert len(cache.read_text().splitlines()) == 10  # every answer it got was written at once
        teacher.hold = lambda: False
        teacher.gate.set()
        rerun = run_cot(*args)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
    finally:
        teacher.close()
    assert teacher.answered == 32  # 10 before the kill, 22 after: none twice
    report = json.loads((tmp_path / "out" / "cot_distill.json").read_text())
    assert report["teacher_calls"] == 22 and report["teacher_cached"] == 10 and report["kept"] == 32


def test_a_failing_api_is_retried_then_named(tiny_dir, tmp_path):
    data = prompts_file(tmp_path, 4)
    teacher = rule_teacher(plan=[429, 500])  # one 429 (Retry-After 0), one 500, then answers
    try:
        proc = run_cot(*QUICK, "--teacher_api_base", teacher.url, "--teacher_model", "rules", "--dataset_name_or_path",
                       data, "--output_dir", tmp_path / "ok", "--teacher_concurrency", "1", "--multitask", "true")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert teacher.answered == 4
    finally:
        teacher.close()
    # multitask: the SFT stage measures the held-out answers asked for directly, as the answer task trains them
    held_out = [json.loads(line) for line in (tmp_path / "ok" / "answer_eval.jsonl").open()]
    assert len(held_out) == 100 and all(r["prompt"].startswith("[answer] Reverse the words:") for r in held_out)
    report = json.loads((tmp_path / "ok" / "cot_distill.json").read_text())
    assert 0 <= report["final_answer_accuracy_before"] <= 1 and 0 <= report["final_answer_accuracy"] <= 1
    broken = rule_teacher(plan=[500] * 100)
    silent = rule_teacher(stall=30.0)
    try:
        for server, message in ((broken, "HTTP 500: boom; gave up after 3 attempts"),
                                (silent, "no answer within 0.5 s; gave up after 3 attempts")):
            start = time.monotonic()
            proc = run_cot(*QUICK, "--teacher_api_base", server.url, "--teacher_model", "rules",
                           "--dataset_name_or_path", data, "--output_dir", tmp_path / "bad", "--teacher_max_retries", "2",
                           "--teacher_timeout", "0.5")
            assert proc.returncode == 1 and f"error: {server.url}/chat/completions: {message}" in proc.stderr, \
                proc.stderr[-2000:]
            assert "Traceback" not in proc.stderr and time.monotonic() - start < 120
    finally:
        broken.close()
        silent.close()
