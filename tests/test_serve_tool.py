"""tools/serve.py driven by the official ``openai`` client (a test-only oracle of the API's shapes): models,
chat and text completions with log-probs, streaming, adapters by model name, adapters pushed at run time,
4xx answers for bad requests, 32 concurrent clients. One server process serves the whole module."""

from __future__ import annotations

import http.client
import json
import math
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import openai
import pytest
from conftest import start_server

from minift.infer.engine import Generator
from minift.train.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
SERVE, GENERATE = ROOT / "tools" / "serve.py", ROOT / "tools" / "generate.py"
KEY = "test-key"
PROMPT = "Reverse the words: red cup"


@pytest.fixture(scope="module")
def server(tiny_dir, random_adapters):
    proc, url = start_server(str(tiny_dir), "--served_model_name", "tiny", "--adapter", f"a={random_adapters / 'a'}",
                             "--adapter", f"b={random_adapters / 'b'}", "--api_key", KEY, "--max_model_len", "128",
                             "--max_request_bytes", "65536")
    assert urlparse(url).hostname == "127.0.0.1"
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server, api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def engine(tiny_dir, random_adapters):
    return Generator.load(str(tiny_dir), {"a": str(random_adapters / "a"), "b": str(random_adapters / "b")})


def chat(client, model: str, text: str = PROMPT, **kwargs):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], **kwargs)


def raw_post(url: str, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict | str]:
    """A POST outside the client (for bodies it would not send): the status and the body (JSON, or text)."""
    parts = urlparse(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.request("POST", parts.path + path, body=body, headers={"Content-Type": "application/json",
                                                                    "Authorization": f"Bearer {KEY}", **(headers or {})})
        response = conn.getresponse()
        data = response.read().decode()
        return response.status, json.loads(data) if response.getheader("Content-Type") == "application/json" else data
    finally:
        conn.close()


def test_lists_models_and_answers_chat_with_logprobs(client, engine):
    assert [m.id for m in client.models.list()] == ["tiny", "a", "b"]
    assert client.models.retrieve("a").parent == "tiny"
    r = chat(client, "a", max_tokens=10, temperature=0, logprobs=True, top_logprobs=3)
    [want] = engine.generate([PROMPT], SamplingParams(max_new_tokens=10, top_logprobs=3), adapter="a")
    [choice] = r.choices
    assert choice.message.role == "assistant" and choice.message.content == want.text
    assert choice.finish_reason == want.finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(engine.render(PROMPT)), 10)
    entries = choice.logprobs.content
    assert "".join(e.token for e in entries) == want.text and len(entries) == 10
    for entry, lp in zip(entries, want.logprobs):
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and all(t <= 0 for t in tops)
        assert math.isclose(entry.logprob, lp, abs_tol=1e-4)
        assert entry.top_logprobs[0].token == entry.token and math.isclose(tops[0], entry.logprob, abs_tol=1e-6)


def test_streams_the_same_text_and_the_usage(client):
    whole = chat(client, "b", max_tokens=12, temperature=0).choices[0].message.content
    chunks = list(chat(client, "b", max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == whole and sum(bool(d) for d in deltas) > 1  # token by token, not one blob
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    text = list(client.completions.create(model="tiny", prompt="red cup", max_tokens=6, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in text) == client.completions.create(
        model="tiny", prompt="red cup", max_tokens=6, temperature=0).choices[0].text


def test_the_model_name_selects_the_base_or_an_adapter(client, engine):
    got = {m: chat(client, m, max_tokens=10, temperature=0).choices[0].message.content for m in ("tiny", "a", "b")}
    for model, adapter in (("tiny", "base"), ("a", "a"), ("b", "b")):
        [want] = engine.generate([PROMPT], SamplingParams(max_new_tokens=10), adapter=adapter)
        assert got[model] == want.text, model
    assert len(set(got.values())) == 3
    # sampled completions with a seed repeat; n completions of one prompt differ; prompt lists answer in order
    ask = dict(model="a", prompt=["red cup", "blue sun"], max_tokens=8, temperature=1.0, n=2, seed=7, logprobs=2)
    first, again = client.completions.create(**ask), client.completions.create(**ask)
    texts = [c.text for c in first.choices]
    assert texts == [c.text for c in again.choices] and len(texts) == 4 and texts[0] != texts[1]
    assert len(first.choices[0].logprobs.top_logprobs[0]) == 2
    want = engine.generate(["red cup", "blue sun"], SamplingParams(max_new_tokens=8, temperature=1.0, seed=7),
                           adapter="a", chat=False, n=2)
    assert texts == [c.text for c in want]


def test_greedy_output_equals_generate_tool(client, tiny_dir, random_adapters):
    proc = subprocess.run([sys.executable, str(GENERATE), str(tiny_dir), "--adapter", f"a={random_adapters / 'a'}",
                           "--use", "a", "--prompt", PROMPT, "--max_new_tokens", "12"], capture_output=True,
                          timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.decode() == chat(client, "a", max_tokens=12, temperature=0).choices[0].message.content + "\n"


def test_an_adapter_pushed_at_run_time_is_served_then_unloaded(server, client, random_adapters):
    status, text = raw_post(server, "/load_lora_adapter", json.dumps({"lora_name": "pushed",
                                                                      "lora_path": str(random_adapters / "b")}).encode())
    assert (status, text) == (200, "Success: LoRA adapter 'pushed' added successfully.")
    assert "pushed" in [m.id for m in client.models.list()]
    assert chat(client, "pushed", max_tokens=10, temperature=0).choices[0].message.content == \
        chat(client, "b", max_tokens=10, temperature=0).choices[0].message.content
    status, err = raw_post(server, "/load_lora_adapter", json.dumps({"lora_name": "g",
                                                                   "lora_path": str(random_adapters / "gpt2")}).encode())
    assert status == 400 and "different base model" in err["error"]["message"]
    status, text = raw_post(server, "/unload_lora_adapter", json.dumps({"lora_name": "pushed"}).encode())
    assert (status, text) == (200, "Success: LoRA adapter 'pushed' removed successfully.")
    with pytest.raises(openai.NotFoundError, match="'pushed' does not exist"):
        chat(client, "pushed", max_tokens=4)
    assert [m.id for m in client.models.list()] == ["tiny", "a", "b"]


def test_bad_requests_get_a_4xx_with_a_message_and_the_server_keeps_serving(server, client):
    def still_serving():
        assert len(chat(client, "tiny", max_tokens=3, temperature=0).choices[0].message.content) > 0

    status, err = raw_post(server, "/chat/completions", b'{"model": "tiny", "messages": [')
    assert status == 400 and "not valid JSON" in err["error"]["message"] and err["error"]["type"]
    still_serving()
    with pytest.raises(openai.NotFoundError, match="'nope' does not exist; served: tiny, a, b") as info:
        chat(client, "nope", max_tokens=4)
    assert info.value.code == "model_not_found"
    still_serving()
    with pytest.raises(openai.BadRequestError, match="maximum context length is 128 tokens") as info:
        chat(client, "a", text="red cup " * 80, max_tokens=4)
    assert info.value.code == "context_length_exceeded"
    still_serving()
    for bad, field in ((dict(temperature=3), "temperature"), (dict(n=0), "n"), (dict(frequency_penalty=0.5),
                                                                                 "frequency_penalty")):
        with pytest.raises(openai.BadRequestError) as info:
            chat(client, "a", max_tokens=4, **bad)
        assert info.value.param == field and field in info.value.message
    with pytest.raises(openai.BadRequestError, match="'messages' must be a non-empty list"):
        client.chat.completions.create(model="a", messages=[], max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="asks for 40 completions") as info:
        client.completions.create(model="a", prompt=["red", "cup"], n=20, max_tokens=4)
    assert info.value.param == "n"
    status, err = raw_post(server, "/completions", b"{}", headers={"Content-Length": "-5"})
    assert status == 400 and "Content-Length" in err["error"]["message"]
    status, err = raw_post(server, "/completions", json.dumps({"model": "a", "prompt": "x" * 70000}).encode())
    assert status == 413 and "at most 65536" in err["error"]["message"]
    still_serving()
    with pytest.raises(openai.AuthenticationError, match="API key"):
        openai.OpenAI(base_url=server, api_key="wrong", max_retries=0, timeout=60).models.list()
    status, _ = raw_post(server, "/completions", b"{}", headers={"Authorization": ""})
    assert status == 401
    still_serving()


def test_32_concurrent_clients_are_all_answered(client, engine):
    prompts = [f"Reverse the words: {w} {i}" for i, w in enumerate(["red cup", "blue sun", "big box", "old map"] * 8)]
    answers: dict[int, str] = {}

    def ask(i: int) -> None:
        answers[i] = chat(client, "a", text=prompts[i], max_tokens=8, temperature=0).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,), daemon=True) for i in range(32)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 240
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    assert len(answers) == 32, f"{32 - len(answers)} clients unanswered after 240 s"
    want = engine.generate(prompts, SamplingParams(max_new_tokens=8), adapter="a")
    assert [answers[i] for i in range(32)] == [c.text for c in want]


def test_bad_command_lines_get_one_clear_error(tiny_dir, random_adapters, tmp_path):
    cases = [(["--adapter", f"x={tmp_path}"], "holds no adapter_config.json"),
             (["--adapter", f"g={random_adapters / 'gpt2'}"], "different base model"),
             (["--adapter", f"base={random_adapters / 'a'}"], "reserved for the base model")]
    for args, message in cases:
        proc = subprocess.run([sys.executable, str(SERVE), str(tiny_dir), *args, "--port", "0"], capture_output=True,
                              text=True, timeout=240, cwd=ROOT)
        assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-1500:]


def test_concurrent_requests_are_decoded_together(engine, monkeypatch):
    """In process: 16 simultaneous requests take a few engine calls of at most --max_batch_size rows, not 16
    calls, and each request gets its own answer."""
    from minift.infer.server import APIServer, ServerConfig

    calls: list[int] = []
    generate = engine.generate
    monkeypatch.setattr(engine, "generate", lambda prompts, *a, **k: calls.append(len(prompts)) or
                        generate(prompts, *a, **k))
    srv = APIServer(engine, ServerConfig(served_model_name="tiny", max_batch_size=8, batch_wait_s=0.05), "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        client = openai.OpenAI(base_url=srv.url, api_key="unused", max_retries=0, timeout=120)
        prompts = [f"red cup {i}" for i in range(16)]
        answers: dict[int, str] = {}
        threads = [threading.Thread(target=lambda i=i: answers.__setitem__(i, client.completions.create(
            model="tiny", prompt=prompts[i], max_tokens=6, temperature=0).choices[0].text), daemon=True)
            for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        srv.shutdown()
        srv.server_close()
    assert sum(calls) == 16 and len(calls) <= 6 and max(calls) == 8, calls
    want = generate(prompts, SamplingParams(max_new_tokens=6), chat=False)
    assert [answers[i] for i in range(16)] == [c.text for c in want]


def test_a_stream_whose_client_leaves_stops_decoding(engine, monkeypatch):
    """A streaming client that disconnects after its first chunk: its rows leave the batch within a few tokens
    (before, they decoded to max_tokens while the next request waited behind them), and the next request is
    answered at once. Nothing ends a completion here but max_tokens, so only the disconnect can stop it."""
    from minift.infer.server import APIServer, ServerConfig
    from minift.train import sampling

    monkeypatch.setattr(sampling, "stop_token_ids", lambda *a: set())
    lengths: list[int] = []
    generate = engine.generate
    monkeypatch.setattr(engine, "generate", lambda *a, **k: [lengths.append(len(c.token_ids)) or c
                                                             for c in generate(*a, **k)])
    srv = APIServer(engine, ServerConfig(served_model_name="tiny", max_tokens=900), "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        parts = urlparse(srv.url)
        body = json.dumps({"model": "tiny", "prompt": "red cup", "max_tokens": 900, "stream": True,
                           "temperature": 1.0}).encode()
        with socket.create_connection((parts.hostname, parts.port), timeout=60) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            received = b""
            while b"data: " not in received:  # the headers and the first event, then the client leaves
                chunk = sock.recv(4096)
                assert chunk, received
                received += chunk
            assert received.startswith(b"HTTP/1.0 200") or received.startswith(b"HTTP/1.1 200"), received
        deadline = time.monotonic() + 60
        while not lengths and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lengths and lengths[0] < 100, lengths  # it stopped a few tokens after the disconnect, not at 900
        client = openai.OpenAI(base_url=srv.url, api_key="unused", max_retries=0, timeout=60)
        start = time.monotonic()
        assert client.completions.create(model="tiny", prompt="red cup", max_tokens=3, temperature=0).choices[0].text
        assert time.monotonic() - start < 10
        status, err = raw_post(srv.url.removesuffix("/v1"), "/v1/completions", b"[" * 100_000 + b"]" * 100_000)
        assert status == 400 and "nested too deeply" in err["error"]["message"], err
    finally:
        srv.shutdown()
        srv.server_close()
