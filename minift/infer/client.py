"""A small client for OpenAI-compatible endpoints (judges, API teachers, rollout servers), standard library only.

The standard library's ``urllib`` is enough for JSON over HTTP and keeps minift free of an HTTP dependency
(``openai`` is a test-only oracle). What the client adds:

- retries with exponential backoff on 429, 5xx, timeouts and dropped connections, honouring ``Retry-After``
  (seconds or an HTTP date), each wait capped at ``max_backoff``; other 4xx fail at once with the server's
  message;
- a timeout per request, so a server that never answers ends in an error naming the URL, never a hang;
- a bound on calls in flight (``concurrency``) and on calls in all (``max_calls``, the budget);
- a disk cache keyed by model, messages and sampling options: a resumed run repeats no call;
- the API key read from an environment variable, sent as a Bearer token and never logged or shown.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Callable

RETRIED = (429, 500, 502, 503, 504)


class APIError(RuntimeError):
    """A request that failed for good: the URL, what happened, and after how many attempts."""


class ChatClient:
    """``client.chat(messages, **options)`` -> the response's JSON (``choices[0].message.content``, ...).

    ``base_url``: the server's API root (``http://127.0.0.1:8000/v1``); ``options``: request fields such as
    ``temperature``, ``max_tokens``, ``logprobs``, ``top_logprobs``. ``calls`` counts the requests made (cache
    hits excluded); ``sleep`` is the waiting function (tests pass a recorder)."""

    def __init__(self, base_url: str, model: str, *, api_key_env: str | None = "OPENAI_API_KEY", timeout: float = 60.0,
                 max_retries: int = 4, backoff: float = 1.0, max_backoff: float = 30.0, concurrency: int = 4,
                 max_calls: int | None = None, cache_dir: str | Path | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if timeout <= 0 or max_retries < 0 or backoff < 0 or concurrency < 1 or (max_calls or 0) < 0:
            raise ValueError("timeout must be > 0, max_retries and backoff >= 0, concurrency >= 1, max_calls >= 0")
        self.root = base_url.rstrip("/")
        self.url = self.root + "/chat/completions"
        self.model, self.timeout, self.max_retries = model, timeout, max_retries
        self.backoff, self.max_backoff, self.concurrency, self.max_calls = backoff, max_backoff, concurrency, max_calls
        self._key = os.environ.get(api_key_env) if api_key_env else None
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.sleep, self.calls, self._lock = sleep, 0, threading.Lock()
        self._slots = threading.BoundedSemaphore(concurrency)

    def __repr__(self) -> str:  # never the key
        return f"ChatClient({self.url!r}, model={self.model!r}, key={'set' if self._key else 'none'})"

    def chat(self, messages: list[dict], **options) -> dict:
        return self._cached("/chat/completions", {"model": self.model, "messages": messages, **options})

    def complete(self, prompt: str | list[int], **options) -> dict:
        """``POST /completions`` (a text or token ids; ``n``, ``seed``, ``logprobs``, ...), cached as :meth:`chat`."""
        return self._cached("/completions", {"model": self.model, "prompt": prompt, **options})

    def cached(self, prompt: str | list[int], **options) -> dict | None:
        """The cached answer of :meth:`complete` for these arguments, if there is one (no request is made)."""
        path = self._cache_path("/completions", {"model": self.model, "prompt": prompt, **options})
        return json.loads(path.read_text()) if path is not None and path.is_file() else None

    def post(self, route: str, body: dict) -> str:
        """``POST`` ``body`` to ``route`` under the API root (e.g. ``/load_lora_adapter``), uncached, with the
        retries of every call; the answer's text."""
        with self._slots:
            return self._post(self.root + route, body, parse=lambda raw: raw.decode())

    def _cached(self, route: str, body: dict) -> dict:
        cached = self._cache_path(route, body)
        if cached is not None and cached.is_file():
            return json.loads(cached.read_text())
        with self._slots:
            answer = self._post(self.root + route, body)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            partial = cached.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
            partial.write_text(json.dumps(answer))
            partial.replace(cached)  # atomic: a killed run leaves no half-written entry
        return answer

    def chat_many(self, requests: list[tuple[list[dict], dict]],
                  on_answer: Callable[[int, dict], None] | None = None) -> list[dict]:
        """``chat`` for each ``(messages, options)``, at most ``concurrency`` at once; answers in order. Identical
        requests are sent once. ``on_answer(i, answer)`` is called in this thread as each answer arrives (e.g. to
        write it down at once)."""
        answers: list[dict | None] = [None] * len(requests)
        same: dict[str, list[int]] = {}  # one request body -> the positions asking it
        for i, (messages, options) in enumerate(requests):
            same.setdefault(json.dumps([messages, options], sort_keys=True), []).append(i)
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = {}
            for at in same.values():
                messages, options = requests[at[0]]
                futures[pool.submit(self.chat, messages, **options)] = at
            for future in as_completed(futures):
                for i in futures[future]:
                    answers[i] = future.result()
                    if on_answer is not None:
                        on_answer(i, answers[i])
        return answers

    def _cache_path(self, route: str, body: dict) -> Path | None:
        """Keyed by the route and body, not the host: a server restarted elsewhere still finds its answers."""
        if self.cache_dir is None:
            return None
        keyed = body if route == "/chat/completions" else {"route": route, **body}  # chat keys as they always have
        key = hashlib.sha256(json.dumps(keyed, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
        return self.cache_dir / key[:2] / f"{key}.json"

    def _post(self, url: str, body: dict, parse: Callable[[bytes], object] = json.loads):
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        for attempt in range(self.max_retries + 1):
            with self._lock:
                if self.max_calls is not None and self.calls >= self.max_calls:
                    raise APIError(f"{url}: the budget of {self.max_calls} calls is spent (raise max_calls, or "
                                   f"resume with the cache to reuse answers)")
                self.calls += 1
            wait, problem = None, ""
            try:
                request = urllib.request.Request(url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return parse(response.read())
            except urllib.error.HTTPError as err:
                problem = f"HTTP {err.code}: {_message(err)}"
                if err.code not in RETRIED:
                    raise APIError(f"{url}: {problem}") from None
                wait = _retry_after(err.headers.get("Retry-After"))
            except (TimeoutError, socket.timeout):
                problem = f"no answer within {self.timeout:g} s"
            except (urllib.error.URLError, ConnectionError) as err:
                problem = f"cannot connect ({getattr(err, 'reason', err)})"
            except json.JSONDecodeError as err:
                raise APIError(f"{url}: the answer is not JSON ({err})") from None
            if attempt == self.max_retries:
                raise APIError(f"{url}: {problem}; gave up after {attempt + 1} attempts")
            self.sleep(min(self.max_backoff, wait if wait is not None else self.backoff * 2 ** attempt))


def _message(err: urllib.error.HTTPError) -> str:
    """The server's error message (OpenAI's ``{"error": {"message": ...}}``), else its body's start."""
    try:
        text = err.read().decode(errors="replace")
    except OSError:
        return err.reason or ""
    try:
        return str(json.loads(text)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return text[:200] or str(err.reason)


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds to wait: a number of seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
