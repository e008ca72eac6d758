"""An OpenAI-compatible HTTP server over a :class:`~minift.infer.engine.Generator`.

Built on the standard library's ``http.server`` (one thread per connection) so that serving needs nothing
beyond minift's own dependencies; the model work happens in one batcher thread. Requests that arrive within
``batch_wait_s`` of each other and ask for the same model (base or adapter) and ``n`` are decoded together
in one call of the sampling engine (static batching: a request that comes while a batch runs waits for the
next one). One lock guards the model, so ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` take
effect between batches.

Routes: ``GET /health``, ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/chat/completions``,
``POST /v1/completions``, ``POST /v1/load_lora_adapter`` ``{"lora_name", "lora_path"}`` and
``POST /v1/unload_lora_adapter`` ``{"lora_name"}`` (as vLLM's). With an API key, every ``/v1`` route needs
``Authorization: Bearer KEY``.
"""

from __future__ import annotations

import hmac
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from minift.infer.engine import BASE, Generator
from minift.infer.openai_api import APIError, Formatter, Request, parse_request

logger = logging.getLogger(__name__)


@dataclass
class ServerConfig:
    """``served_model_name``: the base model's name in ``/v1/models`` (adapters are listed by their names).
    ``max_model_len``: prompt plus completion limit (default: the model's ``max_position_embeddings``)."""

    served_model_name: str
    api_key: str | None = None
    max_batch_size: int = 32
    batch_wait_s: float = 0.005
    max_tokens: int = 256
    max_model_len: int | None = None
    max_request_bytes: int = 1 << 20


class Job:
    """A request waiting for the batcher; its handler thread reads ``events``: ``("text", choice, text,
    finished_completion_or_None)`` while streaming, then ``("done", completions)`` or ``("error", exception)``."""

    def __init__(self, request: Request):
        self.request = request
        self.events: queue.Queue = queue.Queue()
        self.abandoned = False  # set by the handler when a streaming client disconnects: its rows stop decoding

    @property
    def rows(self) -> int:
        return len(self.request.prompts) * self.request.n


class Batcher:
    """Gathers jobs for ``wait_s`` after the first one arrives (up to ``max_rows`` completions), groups them
    by (adapter, n) and decodes each group in one engine call, holding ``lock``."""

    def __init__(self, gen: Generator, *, max_rows: int, wait_s: float):
        self.gen, self.max_rows, self.wait_s = gen, max_rows, wait_s
        self.lock = threading.Lock()
        self.pending: queue.Queue[Job] = queue.Queue()
        self.held: Job | None = None  # gathered but left for the next batch, which it would overflow
        threading.Thread(target=self._loop, name="minift-batcher", daemon=True).start()

    def submit(self, request: Request) -> Job:
        job = Job(request)
        self.pending.put(job)
        return job

    def _gather(self) -> list[Job]:
        jobs = [self.held or self.pending.get()]
        self.held = None
        deadline = time.monotonic() + self.wait_s
        rows = jobs[0].rows
        while rows < self.max_rows:
            try:
                job = self.pending.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if rows + job.rows > self.max_rows:  # it opens the next batch
                self.held = job
                break
            jobs.append(job)
            rows += job.rows
        return jobs

    def _loop(self) -> None:
        while True:
            groups: dict[tuple[str, int], list[Job]] = {}
            for job in self._gather():
                groups.setdefault((job.request.adapter, job.request.n), []).append(job)
            for (adapter, n), jobs in groups.items():
                self._run(adapter, n, jobs)

    def _run(self, adapter: str, n: int, jobs: list[Job]) -> None:
        owners = [(job, i) for job in jobs for i in range(len(job.request.prompts))]

        def on_text(k: int, text: str, done) -> bool:
            job, i = owners[k // n]
            if job.abandoned:
                return False
            if job.request.stream:
                job.events.put(("text", i * n + k % n, text, done))
            return True

        try:
            with self.lock:
                if adapter not in self.gen.names:  # unloaded after the request was checked
                    raise APIError(404, f"The model '{adapter}' was unloaded", param="model", code="model_not_found",
                                   kind="NotFoundError")
                completions = self.gen.generate([p for job in jobs for p in job.request.prompts],
                                                [job.request.params for job, _ in owners], adapter=adapter, n=n,
                                                on_text=on_text if any(job.request.stream for job in jobs) else None)
        except Exception as err:  # answered to each client; the server keeps serving
            if not isinstance(err, APIError):
                logger.exception("generation failed for %d request(s)", len(jobs))
            for job in jobs:
                job.events.put(("error", err))
            return
        at = 0
        for job in jobs:
            job.events.put(("done", completions[at: at + job.rows]))
            at += job.rows


class APIServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the listen backlog (socketserver's 5 dropped bursts of clients: 1 s SYN retries)

    def __init__(self, gen: Generator, config: ServerConfig, host: str = "127.0.0.1", port: int = 8000):
        self.gen, self.config = gen, config
        self.max_model_len = config.max_model_len or getattr(gen.model.config, "max_position_embeddings", 2048)
        self.batcher = Batcher(gen, max_rows=config.max_batch_size, wait_s=config.batch_wait_s)
        self.created = int(time.time())
        super().__init__((host, port), Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    def resolve(self, model: str) -> str:
        """The Generator's name for the model a request names: the served name (or ``base``), or an adapter."""
        if model in (self.config.served_model_name, BASE):
            return BASE
        if model in self.gen.paths:
            return model
        raise APIError(404, f"The model '{model}' does not exist; served: {', '.join(self.model_ids())}",
                       param="model", code="model_not_found", kind="NotFoundError")

    def model_ids(self) -> list[str]:
        return [self.config.served_model_name, *self.gen.paths]

    def model_card(self, name: str) -> dict:
        base = name == self.config.served_model_name
        return {"id": name, "object": "model", "created": self.created, "owned_by": "minift",
                "root": name if base else self.gen.paths[name], "parent": None if base else self.config.served_model_name}

    def parse(self, body, *, chat: bool) -> Request:
        tok = self.gen.tokenizer
        return parse_request(body, chat=chat, resolve=self.resolve, render=self.gen.render,
                             tokenize=lambda text: tok(text, add_special_tokens=False)["input_ids"],
                             vocab_size=self.gen.model.get_input_embeddings().num_embeddings,
                             max_model_len=self.max_model_len, default_max_tokens=self.config.max_tokens,
                             max_n=self.config.max_batch_size)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: APIServer

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        logger.info("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._answer(self._get)

    def do_POST(self) -> None:
        self._answer(self._post)

    def _answer(self, route) -> None:
        self.body_read = self.command != "POST"
        try:
            self._authorize()
            route()
        except APIError as err:
            self.close_connection |= not self.body_read  # an unread body would be taken for the next request
            self._send_json(err.status, err.body())
        except ConnectionError:  # the client left before its answer; nothing to tell it
            self.close_connection = True
        except Exception as err:  # a bug, not the client's fault: say so and keep serving
            logger.exception("%s %s failed", self.command, self.path)
            self._send_json(500, APIError(500, f"internal error: {err}", kind="internal_error").body())

    def _authorize(self) -> None:
        key = self.server.config.api_key
        if key and self.path.startswith("/v1"):
            given = self.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                               code="invalid_api_key", kind="authentication_error")

    def _get(self) -> None:
        path = self.path.split("?")[0].rstrip("/")
        if path == "/health":
            return self._send_json(200, {"status": "ok"})
        if path == "/v1/models":
            return self._send_json(200, {"object": "list", "data": [self.server.model_card(m)
                                                                    for m in self.server.model_ids()]})
        if path.startswith("/v1/models/"):
            name = path[len("/v1/models/"):]
            if name not in self.server.model_ids():
                raise APIError(404, f"The model '{name}' does not exist", code="model_not_found", kind="NotFoundError")
            return self._send_json(200, self.server.model_card(name))
        raise APIError(404, f"no route GET {path}", kind="NotFoundError")

    def _post(self) -> None:
        path = self.path.split("?")[0].rstrip("/")
        routes = {"/v1/chat/completions": self._completions, "/v1/completions": self._completions,
                  "/v1/load_lora_adapter": self._load_adapter, "/v1/unload_lora_adapter": self._unload_adapter}
        if path not in routes:
            raise APIError(404, f"no route POST {path}", kind="NotFoundError")
        routes[path](self._read_json(), path)

    def _read_json(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise APIError(411, "chunked request bodies are not supported: send a Content-Length header")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            raise APIError(400, f"a bad Content-Length header: {self.headers.get('Content-Length')!r}")
        limit = self.server.config.max_request_bytes
        if length > limit:
            raise APIError(413, f"the request body has {length} bytes; this server takes at most {limit}")
        raw = self.rfile.read(length)
        self.body_read = True
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise APIError(400, f"the request body is not valid JSON: {err}") from None
        except RecursionError:
            raise APIError(400, "the request body is JSON nested too deeply") from None

    def _completions(self, body, path: str) -> None:
        request = self.server.parse(body, chat=path.endswith("/chat/completions"))
        fmt = Formatter(request, self.server.gen.tokenizer)
        job = self.server.batcher.submit(request)
        if request.stream:
            return self._stream(job, fmt)
        kind, *payload = job.events.get()
        if kind == "error":
            raise payload[0]
        self._send_json(200, fmt.response(payload[0]))

    def _stream(self, job: Job, fmt: Formatter) -> None:
        """Server-sent events: each choice opens (chat), streams its text, closes with its finish reason; then the usage
        (when ``stream_options.include_usage``) and ``data: [DONE]``. The connection closes at the end."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        connected = True

        def send(data) -> None:
            nonlocal connected
            if connected:
                try:
                    self.wfile.write(f"data: {json.dumps(data) if not isinstance(data, str) else data}\n\n".encode())
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    connected = False  # the client left: its rows leave the batch at their next token
                    job.abandoned = True

        if job.request.chat:  # chat choices open with the assistant's role
            for choice in range(job.rows):
                send(fmt.chunk(choice, None, None))
        while True:
            kind, *payload = job.events.get()
            if kind == "text":
                choice, text, done = payload
                send(fmt.chunk(choice, text, done))
            elif kind == "error":
                err = payload[0]
                if not isinstance(err, APIError):
                    err = APIError(500, f"generation failed: {err}", kind="internal_error")
                send(err.body())
                break
            else:
                if job.request.include_usage:
                    send(fmt.usage_chunk(payload[0]))
                break
        send("[DONE]")

    def _load_adapter(self, body, _path: str) -> None:
        name, path = self._adapter_fields(body, "lora_name"), self._adapter_fields(body, "lora_path")
        if name in self.server.model_ids():
            raise APIError(400, f"the adapter '{name}' is already loaded; unload it first", param="lora_name")
        with self.server.batcher.lock:
            try:
                self.server.gen.add_adapter(name, path)
            except (ValueError, FileNotFoundError, OSError) as err:
                raise APIError(400, f"cannot load {path} as '{name}': {err}", param="lora_path") from None
        logger.info("adapter %s loaded from %s", name, path)
        self._send_text(200, f"Success: LoRA adapter '{name}' added successfully.")

    def _unload_adapter(self, body, _path: str) -> None:
        name = self._adapter_fields(body, "lora_name")
        if name not in self.server.gen.paths:
            raise APIError(404, f"no adapter named '{name}' is loaded", param="lora_name", kind="NotFoundError")
        with self.server.batcher.lock:
            self.server.gen.remove_adapter(name)
        self._send_text(200, f"Success: LoRA adapter '{name}' removed successfully.")

    @staticmethod
    def _adapter_fields(body, key: str) -> str:
        value = body.get(key) if isinstance(body, dict) else None
        if not isinstance(value, str) or not value:
            raise APIError(400, f"'{key}' is required (a non-empty string)", param=key)
        return value

    def _send_json(self, status: int, payload: dict) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _send_text(self, status: int, text: str) -> None:
        self._send(status, text.encode(), "text/plain; charset=utf-8")

    def _send(self, status: int, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
