"""The OpenAI request and response formats, apart from HTTP: parse a ``/v1/chat/completions`` or
``/v1/completions`` body into a :class:`Request` (checked, with OpenAI-style errors), and turn completions
into response bodies and streamed chunks.

Supported fields: ``model``, ``messages`` / ``prompt``, ``n``, ``max_tokens`` (chat also
``max_completion_tokens``), ``temperature`` (default 1, as OpenAI's), ``top_p``, ``stop``, ``seed``,
``logprobs`` / ``top_logprobs`` (chat) or ``logprobs: K`` (completions), ``stream`` and
``stream_options.include_usage``; vLLM's ``top_k``, ``min_p`` and ``return_tokens_as_token_ids`` (each reported
token as ``"token_id:N"``, the final EOS included: what a trainer needs to score the very tokens sampled). Fields the engine cannot honour (tools,
penalties, logit_bias, echo, ...) are refused with a 400 rather than silently ignored. Reported log-probs are
the model's at temperature 1, before any top-p / top-k filtering.
"""

from __future__ import annotations

import secrets
import time
import uuid
from dataclasses import dataclass, field

from minift.train.sampling import Completion, SamplingParams

# field -> the value that means "off"; anything else is refused
UNSUPPORTED = {"tools": None, "tool_choice": None, "functions": None, "function_call": None, "logit_bias": None,
               "echo": False, "suffix": None, "best_of": 1, "frequency_penalty": 0, "presence_penalty": 0,
               "response_format": {"type": "text"}}


class APIError(Exception):
    """An error answered to the client as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Request:
    """One checked request: which model, the prompts (token ids), how to sample, and how to answer."""

    chat: bool
    model: str  # the name the client asked for, echoed back
    adapter: str  # the Generator's name for it
    prompts: list[list[int]]
    params: SamplingParams
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # None: none; else how many alternatives per token (0: only the chosen)
    token_ids: bool = False  # report tokens as "token_id:N", every one (vLLM's return_tokens_as_token_ids)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))


def _get(body: dict, key: str, kinds: tuple, default=None, *, check=None, rule: str = ""):
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds or (check and not check(value)):
        names = "/".join("number" if k is float else k.__name__ for k in kinds)
        raise APIError(400, f"'{key}' must be {rule or 'a ' + names}, got {value!r}", param=key)
    return value


def _text_content(message: dict, i: int):
    content = message.get("content")
    if isinstance(content, list):  # content parts: only text ones can be served by a text model
        if any(not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str) for p in content):
            raise APIError(400, f"messages[{i}].content: only text parts ({{'type': 'text', 'text': ...}}) are "
                                "supported", param=f"messages[{i}].content")
        return "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise APIError(400, f"messages[{i}].content must be a string or a list of text parts", param="messages")
    return content


def parse_request(body, *, chat: bool, resolve, render, tokenize, vocab_size: int, max_model_len: int,
                  default_max_tokens: int, max_n: int) -> Request:
    """Check a decoded JSON ``body``. ``resolve(model) -> adapter name`` (raises APIError 404), ``render(messages)``
    and ``tokenize(text)`` give token ids. Prompt plus ``max_tokens`` must fit ``max_model_len``; without
    ``max_tokens`` the completion may take ``default_max_tokens``, cut to what the context has left."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    for key, off in UNSUPPORTED.items():
        if body.get(key) not in (None, off):
            raise APIError(400, f"'{key}' is not supported by this server", param=key)
    model = _get(body, "model", (str,))
    if model is None:
        raise APIError(400, "'model' is required: one of GET /v1/models", param="model")
    adapter = resolve(model)
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "'messages' must be a non-empty list of {role, content}", param="messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise APIError(400, f"messages[{i}] must be an object with a 'role' and a 'content'", param="messages")
        prompts = [render([{"role": m["role"], "content": _text_content(m, i)} for i, m in enumerate(messages)])]
    else:
        prompts = _completion_prompts(body.get("prompt"), tokenize, vocab_size)
    max_tokens = _get(body, "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens",
                      (int,), check=lambda v: v >= 1, rule="an integer >= 1")
    longest = max(len(p) for p in prompts)
    if longest + (max_tokens or 1) > max_model_len:
        asked = f" and max_tokens asks for {max_tokens} more" if max_tokens else " and leaves no room for a completion"
        raise APIError(400, f"This model's maximum context length is {max_model_len} tokens; the prompt has "
                            f"{longest} tokens{asked}. Shorten the prompt or lower max_tokens.",
                       param="messages" if chat else "prompt", code="context_length_exceeded")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, "'stop' must be a non-empty string or a list of them", param="stop")
    if chat:
        want = _get(body, "logprobs", (bool,), False)
        top = _get(body, "top_logprobs", (int,), 0, check=lambda v: 0 <= v <= 20, rule="an integer in [0, 20]")
        if top and not want:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        logprobs = top if want else None
    else:
        logprobs = _get(body, "logprobs", (int,), None, check=lambda v: 0 <= v <= 20, rule="an integer in [0, 20]")
    params = SamplingParams(
        max_new_tokens=max_tokens or min(default_max_tokens, max_model_len - longest),
        temperature=_get(body, "temperature", (int, float), 1.0, check=lambda v: 0 <= v <= 2, rule="in [0, 2]"),
        top_p=_get(body, "top_p", (int, float), 1.0, check=lambda v: 0 < v <= 1, rule="in (0, 1]"),
        top_k=max(0, _get(body, "top_k", (int,), 0, check=lambda v: v >= -1, rule="an integer >= -1 (0 or -1: off)")),
        min_p=_get(body, "min_p", (int, float), 0.0, check=lambda v: 0 <= v < 1, rule="in [0, 1)"),
        stop=tuple(stop), seed=_get(body, "seed", (int,), secrets.randbits(62)), top_logprobs=logprobs or 0)
    n = _get(body, "n", (int,), 1, check=lambda v: 1 <= v <= max_n, rule=f"an integer in [1, {max_n}]")
    if len(prompts) * n > max_n:
        raise APIError(400, f"{len(prompts)} prompts x n={n} asks for {len(prompts) * n} completions; this server "
                            f"decodes at most {max_n} at once (--max_batch_size)", param="n")
    options = _get(body, "stream_options", (dict,), {})
    return Request(chat=chat, model=model, adapter=adapter, prompts=prompts, params=params, n=n,
                   stream=_get(body, "stream", (bool,), False), include_usage=bool(options.get("include_usage")),
                   logprobs=logprobs, token_ids=_get(body, "return_tokens_as_token_ids", (bool,), False))


def _completion_prompts(prompt, tokenize, vocab_size: int) -> list[list[int]]:
    """``prompt``: a string, a list of strings, a list of token ids or a list of such lists."""
    if isinstance(prompt, str):
        prompts = [tokenize(prompt)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = [tokenize(p) for p in prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) and all(isinstance(t, int) for t in p)
                                                     for p in prompt):
        prompts = prompt
    else:
        raise APIError(400, "'prompt' must be a string, a list of strings, or token ids", param="prompt")
    for p in prompts:
        if not p:
            raise APIError(400, "a prompt is empty (no tokens)", param="prompt")
        if any(not 0 <= t < vocab_size for t in p):
            raise APIError(400, f"a prompt holds token ids outside the vocabulary [0, {vocab_size})", param="prompt")
    return prompts


class Formatter:
    """Response bodies and stream chunks of one request, in OpenAI's shapes."""

    def __init__(self, request: Request, tokenizer):
        self.req, self.tokenizer = request, tokenizer
        self.special = set(tokenizer.all_special_ids)
        self.object = "chat.completion" if request.chat else "text_completion"
        self.id = ("chatcmpl-" if request.chat else "cmpl-") + request.id

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.req.created, "model": self.req.model}

    def _shown(self, c: Completion) -> int:
        """How many of the completion's tokens are reported: a final special token (EOS) is not text, unless the
        tokens are reported by id."""
        return len(c.token_ids) - bool(not self.req.token_ids and c.token_ids and c.token_ids[-1] in self.special)

    def _token(self, token_id: int) -> str:
        return f"token_id:{token_id}" if self.req.token_ids else self.tokenizer.decode([token_id])

    def logprobs(self, c: Completion) -> dict | None:
        if self.req.logprobs is None:
            return None
        count = self._shown(c)
        token = [self._token(t) for t in c.token_ids[:count]]
        tops = [[(self._token(t), lp) for t, lp in alts] for alts in c.top_logprobs[:count]]
        if self.req.chat:
            def entry(tok: str, lp: float) -> dict:
                return {"token": tok, "logprob": lp, "bytes": list(tok.encode())}

            return {"content": [{**entry(tok, lp), "top_logprobs": [entry(*alt) for alt in (tops[i] if tops else [])]}
                                for i, (tok, lp) in enumerate(zip(token, c.logprobs))]}
        offsets, at = [], 0
        for tok in token:
            offsets.append(at)
            at += len(tok)
        return {"tokens": token, "token_logprobs": c.logprobs[:count],
                "top_logprobs": [dict(alts) for alts in tops] if tops else None, "text_offset": offsets}

    def usage(self, completions: list[Completion]) -> dict:
        prompt = sum(len(p) for p in self.req.prompts)
        new = sum(len(c.token_ids) for c in completions)
        return {"prompt_tokens": prompt, "completion_tokens": new, "total_tokens": prompt + new}

    def response(self, completions: list[Completion]) -> dict:
        choices = []
        for i, c in enumerate(completions):
            choice = {"index": i, "finish_reason": c.finish_reason, "logprobs": self.logprobs(c)}
            choice.update({"message": {"role": "assistant", "content": c.text}} if self.req.chat else {"text": c.text})
            choices.append(choice)
        return {**self._head(self.object), "choices": choices, "usage": self.usage(completions)}

    def chunk(self, index: int, text: str | None, done: Completion | None) -> dict:
        """A stream chunk for choice ``index``: ``text=None`` opens the choice (chat: the assistant role),
        ``done`` closes it with its finish reason (and its log-probs, when asked for)."""
        choice: dict = {"index": index, "finish_reason": done.finish_reason if done else None,
                        "logprobs": self.logprobs(done) if done else None}
        if self.req.chat:
            choice["delta"] = {"role": "assistant", "content": ""} if text is None else {"content": text} if text else {}
        else:
            choice["text"] = text or ""
        return {**self._head(self.object + ".chunk" if self.req.chat else self.object), "choices": [choice]}

    def usage_chunk(self, completions: list[Completion]) -> dict:
        return {**self._head(self.object + ".chunk" if self.req.chat else self.object), "choices": [],
                "usage": self.usage(completions)}
