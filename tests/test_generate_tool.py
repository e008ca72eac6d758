"""tools/generate.py: one prompt, batch JSONL (resumable after SIGKILL), and the interactive chat on a pty."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minift.infer.engine import Generator
from minift.train.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "generate.py"


def run_tool(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


@pytest.fixture(scope="module")
def engine(tiny_dir, random_adapters):
    return Generator.load(str(tiny_dir), {"a": str(random_adapters / "a"), "b": str(random_adapters / "b")})


def test_one_prompt_prints_the_engines_greedy_completion(tiny_dir, random_adapters, engine):
    proc = subprocess.run([sys.executable, str(TOOL), str(tiny_dir), "--adapter", f"a={random_adapters / 'a'}",
                           "--prompt", "Reverse the words: red cup", "--max_new_tokens", "12"],
                          capture_output=True, timeout=240, cwd=ROOT)  # bytes: the text may hold a \r
    assert proc.returncode == 0, proc.stderr[-2000:]
    [c] = engine.generate(["Reverse the words: red cup"], SamplingParams(max_new_tokens=12), adapter="a")
    assert proc.stdout.decode() == c.text + "\n" and len(c.token_ids) == 12


@pytest.mark.slow
def test_batch_mode_killed_and_rerun_generates_only_the_rest(tiny_dir, random_adapters, engine, tmp_path):
    """SIGKILL after some records are written; the rerun keeps those lines byte for byte, generates only the
    others (it says how many), and the file then holds every record once with the engine's completions."""
    records = [{"prompt": f"Reverse the words: {' '.join(['red', 'cup', 'sun', 'box'][: 1 + i % 4])} {i}",
                "answer": str(i)} for i in range(40)]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out.jsonl"
    args = [sys.executable, str(TOOL), str(tiny_dir), "--adapter", f"a={random_adapters / 'a'}", "--input", str(data),
            "-o", str(out), "--batch_size", "2", "--max_new_tokens", "24"]
    victim = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while not (out.exists() and out.read_text().count("\n") >= 4):
            assert victim.poll() is None, "the batch run ended before it could be killed"
            assert time.monotonic() < deadline, "no output within 180 s"
            time.sleep(0.01)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=30)
    finally:
        if victim.poll() is None:
            victim.kill()
    before = out.read_bytes()
    kept = before[: before.rfind(b"\n") + 1]
    n_kept = kept.count(b"\n")
    assert 4 <= n_kept < 40
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{40 - n_kept} generated, {n_kept} already in" in proc.stderr
    after = out.read_bytes()
    assert after.startswith(kept)
    rows = [json.loads(line) for line in after.decode().splitlines()]
    assert sorted(r["index"] for r in rows) == list(range(40))
    expected = engine.generate([r["prompt"] for r in records], SamplingParams(max_new_tokens=24), adapter="a")
    for row in rows:
        assert row["completion"] == expected[row["index"]].text and row["answer"] == str(row["index"])
        assert row["model"] == "a" and row["finish_reason"] == expected[row["index"]].finish_reason


def _read_until(fd: int, marker: str, seen: list[str], timeout: float = 120) -> str:
    """Read the pty until ``marker`` appears after what was read so far; return the new text."""
    start, deadline = len("".join(seen)), time.monotonic() + timeout
    while marker not in "".join(seen)[start:]:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no {marker!r} within {timeout} s; got {''.join(seen)[start:]!r}"
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            try:
                seen.append(os.read(fd, 4096).decode(errors="replace"))
            except OSError:  # the child closed the terminal
                break
    return "".join(seen)[start:]


def test_chat_on_a_terminal_streams_switches_adapters_and_quits(tiny_dir, random_adapters, engine):
    """Driven through a pseudo-terminal: a message gets the streamed reply of the active adapter (the engine's
    greedy answer for that conversation), ``/adapter b`` switches, the next reply is b's with the history, and
    ``/quit`` exits 0."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: the chat tool on the pty
        os.chdir(ROOT)
        os.execv(sys.executable, [sys.executable, str(TOOL), str(tiny_dir), "--adapter", f"a={random_adapters / 'a'}",
                                  "--adapter", f"b={random_adapters / 'b'}", "--use", "a", "--chat",
                                  "--max_new_tokens", "10"])
    seen: list[str] = []
    try:
        _read_until(fd, "[a] you> ", seen)
        os.write(fd, b"hello there\n")
        reply_a = _read_until(fd, "[a] you> ", seen)
        os.write(fd, b"/adapter b\n")
        assert "(now b)" in _read_until(fd, "[b] you> ", seen)
        os.write(fd, b"and again\n")
        reply_b = _read_until(fd, "[b] you> ", seen)
        os.write(fd, b"/quit\n")
        _, status = os.waitpid(pid, 0)
        pid = 0
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    params = SamplingParams(max_new_tokens=10)
    [first] = engine.generate([[{"role": "user", "content": "hello there"}]], params, adapter="a")
    history = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": first.text},
               {"role": "user", "content": "and again"}]
    [second] = engine.generate([history], params, adapter="b")

    def shown(text: str) -> str:  # the terminal turns \n into \r\n
        return text.replace("\r\n", "\n").split("assistant> ", 1)[1].rsplit("\n[", 1)[0]

    assert shown(reply_a) == first.text.replace("\r\n", "\n") and shown(reply_b) == second.text.replace("\r\n", "\n")


def test_bad_input_gets_one_clear_error(tiny_dir, random_adapters, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"nothing": 1}\n')
    cases = [
        (["--input", str(empty), "-o", str(tmp_path / "o.jsonl")], "empty.jsonl is empty"),
        (["--input", str(bad), "-o", str(tmp_path / "o.jsonl")], "bad.jsonl:2"),
        (["--use", "nope", "--prompt", "hi"], "--use nope: no such model; loaded: base"),
        (["--adapter", f"g={random_adapters / 'gpt2'}", "--prompt", "hi"], "different base model"),
        (["--adapter", f"x={tmp_path}", "--prompt", "hi"], "holds no adapter_config.json"),
    ]
    for args, message in cases:
        proc = run_tool(str(tiny_dir), *args)
        assert proc.returncode == 1 and message in proc.stderr, (args, proc.stderr[-1500:])
        assert "Traceback" not in proc.stderr
