"""minift.infer.client against a scripted OpenAI-style server on 127.0.0.1: retries and Retry-After, errors that
name the URL and never hang, the call budget, the disk cache (a rerun makes no call), concurrency, the key."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import start_server

from minift.infer.client import APIError, ChatClient

ANSWER = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "A"}, "finish_reason": "stop"}]}


class Script:
    """What the server answers: a list of (status, headers, body or seconds to stall), the last one repeating."""

    def __init__(self, *replies):
        self.replies, self.seen, self.in_flight, self.most_in_flight = list(replies), [], 0, 0
        self.lock = threading.Lock()

    def next(self, request: dict, headers) -> tuple:
        with self.lock:
            self.seen.append((request, headers.get("Authorization")))
            return self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]


@pytest.fixture
def server():
    holder = {}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            script = holder["script"]
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            status, headers, payload = script.next(body, self.headers)
            with script.lock:
                script.in_flight += 1
                script.most_in_flight = max(script.most_in_flight, script.in_flight)
            if isinstance(payload, float):  # stall
                time.sleep(payload)
                payload = ANSWER
            with script.lock:  # done before the reply is written: once the client reads it, it may send the next call
                script.in_flight -= 1
            data = json.dumps(payload).encode()
            try:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()

    def start(*replies) -> tuple[str, Script]:
        holder["script"] = Script(*replies)
        return f"http://127.0.0.1:{httpd.server_address[1]}/v1", holder["script"]

    yield start
    httpd.shutdown()
    httpd.server_close()


MESSAGES = [{"role": "user", "content": "Which answer is better, A or B?"}]


def test_answers_and_the_cache_makes_a_rerun_call_nothing(server, tmp_path, monkeypatch):
    url, script = server((200, {}, ANSWER))
    monkeypatch.setenv("JUDGE_KEY", "sk-secret-123")
    client = ChatClient(url, "judge", api_key_env="JUDGE_KEY", cache_dir=tmp_path / "cache")
    assert client.chat(MESSAGES, temperature=0, max_tokens=1) == ANSWER
    assert script.seen[0][0] == {"model": "judge", "messages": MESSAGES, "temperature": 0, "max_tokens": 1}
    assert script.seen[0][1] == "Bearer sk-secret-123" and "sk-secret" not in repr(client)
    again = ChatClient(url, "judge", api_key_env="JUDGE_KEY", cache_dir=tmp_path / "cache")  # a resumed run
    assert again.chat(MESSAGES, temperature=0, max_tokens=1) == ANSWER and again.calls == 0 and len(script.seen) == 1
    again.chat(MESSAGES, temperature=0, max_tokens=2)  # other options: another key
    assert len(script.seen) == 2


def test_429_and_500_are_retried_honouring_retry_after(server):
    url, script = server((429, {"Retry-After": "3"}, {"error": {"message": "slow down"}}),
                         (500, {}, {"error": {"message": "boom"}}), (200, {}, ANSWER))
    waits = []
    client = ChatClient(url, "judge", backoff=0.5, sleep=waits.append)
    assert client.chat(MESSAGES) == ANSWER
    assert waits == [3.0, 1.0] and client.calls == 3  # Retry-After, then backoff x 2^1


def test_errors_name_the_url_and_never_hang(server):
    url, _ = server((503, {}, {"error": {"message": "overloaded"}}))
    waits = []
    with pytest.raises(APIError, match=r"127\.0\.0\.1.*HTTP 503: overloaded; gave up after 3 attempts"):
        ChatClient(url, "judge", max_retries=2, sleep=waits.append).chat(MESSAGES)
    assert waits == [1.0, 2.0]
    url, script = server((400, {}, {"error": {"message": "unknown field 'foo'"}}))
    with pytest.raises(APIError, match="HTTP 400: unknown field 'foo'$"):
        ChatClient(url, "judge", sleep=waits.append).chat(MESSAGES)
    assert len(script.seen) == 1  # not retried
    url, _ = server((200, {}, 5.0))  # never answers in time
    start = time.monotonic()
    with pytest.raises(APIError, match=r"no answer within 0.3 s; gave up after 2 attempts"):
        ChatClient(url, "judge", timeout=0.3, max_retries=1, sleep=lambda s: None).chat(MESSAGES)
    assert time.monotonic() - start < 3
    with pytest.raises(APIError, match=r"127\.0\.0\.1:9/v1/chat/completions: cannot connect"):
        ChatClient("http://127.0.0.1:9/v1", "judge", max_retries=0).chat(MESSAGES)


def test_budget_and_concurrency(server):
    url, script = server((200, {}, 0.2))
    client = ChatClient(url, "judge", concurrency=2, max_calls=6)
    answers = client.chat_many([([{"role": "user", "content": f"q{i}"}], {}) for i in range(6)])
    assert answers == [ANSWER] * 6 and script.most_in_flight == 2
    with pytest.raises(APIError, match="the budget of 6 calls is spent"):
        client.chat(MESSAGES)
    with pytest.raises(ValueError, match="http:// or https://"):
        ChatClient("127.0.0.1:8000", "judge")


def test_identical_requests_go_once_and_each_answer_is_handed_over_as_it_arrives(server):
    url, script = server((200, {}, 0.05))
    client = ChatClient(url, "judge", concurrency=3)
    requests = [([{"role": "user", "content": q}], {"temperature": 0}) for q in ("a", "b", "a", "c", "b")]
    seen = []
    answers = client.chat_many(requests, on_answer=lambda i, answer: seen.append(i))
    assert answers == [ANSWER] * 5 and sorted(seen) == [0, 1, 2, 3, 4]
    assert sorted(r["messages"][0]["content"] for r, _ in script.seen) == ["a", "b", "c"]  # each body once


def test_against_minift_s_own_server(tiny_dir):
    """End to end against tools/serve.py (the tiny model, its own process): greedy text and top log-probs."""
    proc, url = start_server(str(tiny_dir), "--served_model_name", "tiny")
    try:
        client = ChatClient(url, "tiny", api_key_env=None, timeout=120)
        answer = client.chat([{"role": "user", "content": "Reverse the words: red cup"}], temperature=0, max_tokens=4,
                             logprobs=True, top_logprobs=2)
        choice = answer["choices"][0]
        assert choice["message"]["content"] and len(choice["logprobs"]["content"]) >= 1
        assert len(choice["logprobs"]["content"][0]["top_logprobs"]) == 2
        with pytest.raises(APIError, match="HTTP 404"):
            ChatClient(url, "no-such-model", api_key_env=None, max_retries=0).chat(MESSAGES)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
