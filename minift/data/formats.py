"""Detect record formats and normalize records into training examples.

Normalized forms:

* ``Chat(messages, source)``: SFT conversations and prompt/completion-style records (one user turn,
  one assistant turn); loss on assistant turns.
* ``Text(text, source)``: plain text; loss on everything.
* ``Preference(prompt, chosen, rejected, source)``: message lists; loss on chosen/rejected turns.
* ``Unpaired(prompt, completion, label, source)``: KTO-style.
* ``Prompt(messages, extra, source)``: prompt-only (online RL, distillation); ``extra`` carries the
  other fields (e.g. a reference ``answer``) through to reward functions.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

from minift.data.read import Record, RecordError

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bot": "assistant", "model": "assistant", "tool": "tool", "function": "tool"}


@dataclass
class Chat:
    messages: list[dict]
    source: str


@dataclass
class Text:
    text: str
    source: str


@dataclass
class Preference:
    prompt: list[dict]
    chosen: list[dict]
    rejected: list[dict]
    source: str


@dataclass
class Unpaired:
    prompt: list[dict]
    completion: list[dict]
    label: bool
    source: str


@dataclass
class Prompt:
    messages: list[dict]
    extra: dict
    source: str


@dataclass
class Normalized:
    """Usable examples plus the counts a run must report (nothing dropped silently)."""

    examples: list = field(default_factory=list)
    formats: Counter = field(default_factory=Counter)
    skipped: list[str] = field(default_factory=list)  # "source: reason", for --skip_invalid

    def summary(self) -> str:
        parts = [f"{name}: {n}" for name, n in sorted(self.formats.items())]
        if self.skipped:
            parts.append(f"skipped as invalid: {len(self.skipped)} (first: {self.skipped[0]})")
        return ", ".join(parts) or "no records"


def detect_format(data: dict) -> str | None:
    """The record format name, from the keys present (None when nothing matches)."""
    keys = data.keys()
    if "chosen" in keys and "rejected" in keys:
        return "preference" if "prompt" in keys else "preference_implicit"
    if "completion" in keys and "label" in keys:
        return "unpaired"
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys and ("output" in keys or "response" in keys):
        return "alpaca"
    if "prompt" in keys and "completion" in keys:
        return "prompt_completion"
    if "question" in keys and "answer" in keys:
        return "context_question_answer" if "context" in keys else "question_answer"
    if "text" in keys:
        return "text"
    if "prompt" in keys:
        return "prompt"
    return None


def _string(data: dict, key: str, source: str) -> str:
    value = data.get(key)
    if not isinstance(value, str):
        raise RecordError(f"{source}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _messages(value: Any, source: str, key: str, sharegpt: bool = False) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise RecordError(f"{source}: field {key!r} must be a non-empty list of messages, got {type(value).__name__}")
    out = []
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise RecordError(f"{source}: {key}[{i}] must be an object with {role_key!r} and {content_key!r}")
        role, content = msg.get(role_key), msg.get(content_key)
        if sharegpt:
            if role not in SHAREGPT_ROLES:
                raise RecordError(f"{source}: {key}[{i}] has unknown speaker {role!r}; use one of {sorted(SHAREGPT_ROLES)}")
            role = SHAREGPT_ROLES[role]
        elif role not in ROLES:
            raise RecordError(f"{source}: {key}[{i}] has unknown role {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise RecordError(f"{source}: {key}[{i}].{content_key} must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


SKIP_HINT = "(or pass skip_invalid to count and skip such records)"


def _in_order(msgs: list[dict], source: str, key: str) -> list[dict]:
    """``msgs`` when its turns come in the order every chat template accepts: an optional system message first,
    then user and assistant taking turns, tool results right after the assistant turn that called them."""
    for i, role in enumerate(m["role"] for m in msgs):
        before = msgs[i - 1]["role"] if i else None
        if role == "system" and i:
            problem = "is a system message after the first turn; a system message comes first"
        elif role == "assistant" and before in (None, "system"):
            problem = "is the assistant's, before any user turn; a conversation starts with the user"
        elif role == before and role != "tool":
            problem = f"is a second {role} turn in a row; merge the two into one"
        elif role == "tool" and before not in ("assistant", "tool"):
            problem = "is a tool result that follows no assistant turn"
        else:
            continue
        raise RecordError(f"{source}: {key}[{i}] {problem} {SKIP_HINT}")
    return msgs


def _turn(value: Any, role: str, source: str, key: str) -> list[dict]:
    """A string becomes one message of ``role``; a list is checked as messages."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return _messages(value, source, key)


def _user_assistant(prompt: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def _answered(messages: list[dict], src: str) -> Chat:
    """A conversation with at least one non-empty assistant turn: one whose answers are all empty would train on the
    end-of-turn token alone."""
    answers = [m for m in messages if m["role"] == "assistant"]
    if answers and not any(m["content"].strip() for m in answers):
        raise RecordError(f"{src}: the assistant's answer is empty, so there is nothing to learn but the end of the "
                          f"turn; fill it in or remove the record {SKIP_HINT}")
    return Chat(messages, src)


def normalize(record: Record, fmt: str | None = None):
    """Turn one record into Chat / Text / Preference / Unpaired / Prompt, or raise RecordError."""
    data, src = record.data, record.source
    if "__invalid__" in data:
        raise RecordError(f"{src}: {data['__invalid__']}")
    fmt = fmt or detect_format(data)
    if fmt is None:
        raise RecordError(f"{src}: no known record format in fields {sorted(data)}; expected e.g. messages, "
                          f"conversations, instruction/output, prompt/completion, question/answer, text, "
                          f"prompt/chosen/rejected")
    if fmt == "messages":
        return _answered(_in_order(_messages(data.get("messages"), src, "messages"), src, "messages"), src)
    if fmt == "sharegpt":
        turns = _messages(data.get("conversations"), src, "conversations", sharegpt=True)
        return _answered(_in_order(turns, src, "conversations"), src)
    if fmt == "alpaca":
        instruction = _string(data, "instruction", src)
        extra = data.get("input") or ""
        if not isinstance(extra, str):
            raise RecordError(f"{src}: field 'input' must be a string, got {type(extra).__name__}")
        answer = _string(data, "output" if "output" in data else "response", src)
        return _answered(_user_assistant(f"{instruction}\n\n{extra}" if extra else instruction, answer), src)
    if fmt == "prompt_completion":
        turns = _turn(data.get("prompt"), "user", src, "prompt") + _turn(data.get("completion"), "assistant", src,
                                                                         "completion")
        return _answered(_in_order(turns, src, "prompt + completion"), src)
    if fmt == "question_answer":
        return _answered(_user_assistant(_string(data, "question", src), _string(data, "answer", src)), src)
    if fmt == "context_question_answer":
        prompt = f"{_string(data, 'context', src)}\n\n{_string(data, 'question', src)}"
        return _answered(_user_assistant(prompt, _string(data, "answer", src)), src)
    if fmt == "text":
        return Text(_string(data, "text", src), src)
    if fmt == "preference":
        return _preference(_turn(data.get("prompt"), "user", src, "prompt"),
                           _turn(data.get("chosen"), "assistant", src, "chosen"),
                           _turn(data.get("rejected"), "assistant", src, "rejected"), src)
    if fmt == "preference_implicit":
        return _implicit_preference(data, src)
    if fmt == "unpaired":
        label = data.get("label")
        if not isinstance(label, bool):
            raise RecordError(f"{src}: field 'label' must be true or false, got {label!r}")
        prompt = _turn(data.get("prompt", ""), "user", src, "prompt") if data.get("prompt") else []
        completion = _turn(data.get("completion"), "assistant", src, "completion")
        if prompt:
            _in_order(prompt + completion, src, "prompt + completion")
        return Unpaired(prompt, completion, label, src)
    if fmt == "prompt":
        extra = {k: v for k, v in data.items() if k not in ("prompt", "messages")}
        if "messages" in data:
            msgs = _in_order(_messages(data["messages"], src, "messages"), src, "messages")
            if msgs[-1]["role"] == "assistant" and len(msgs) > 1:  # the answer to generate is the reference
                return Prompt(msgs[:-1], {"answer": msgs[-1]["content"], **extra}, src)
            return Prompt(msgs, extra, src)
        return Prompt(_in_order(_turn(data.get("prompt"), "user", src, "prompt"), src, "prompt"), extra, src)
    raise ValueError(f"unknown record format {fmt!r}")


def _implicit_preference(data: dict, src: str) -> Preference:
    chosen = _messages(data.get("chosen"), src, "chosen")
    rejected = _messages(data.get("rejected"), src, "rejected")
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise RecordError(f"{src}: chosen and rejected share no leading turns, so there is no implicit prompt; "
                          f"add a 'prompt' field")
    for name, msgs in (("chosen", chosen), ("rejected", rejected)):
        if msgs[-1]["role"] != "assistant":
            raise RecordError(f"{src}: the last turn of {name!r} must be the assistant's")
    return _preference(chosen[:n], chosen[n:], rejected[n:], src)


def _preference(prompt: list[dict], chosen: list[dict], rejected: list[dict], src: str) -> Preference:
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        if not any(str(t.get("content") or "").strip() for t in turns):
            raise RecordError(f"{src}: the {name} answer is empty; a preference pair needs two real answers "
                              f"(remove the record or pass skip_invalid to count and skip such records)")
        if prompt:
            _in_order(prompt + turns, src, f"prompt + {name}")

    def words(turns):
        return [(t["role"], t["content"].split()) for t in turns]

    # Either way the loss's gradient is (near) zero and the pair only dilutes the batch.
    same = "are identical" if chosen == rejected else "differ only in whitespace" if words(chosen) == words(rejected) \
        else None
    if same:
        raise RecordError(f"{src}: chosen and rejected {same}, so the pair expresses no preference; remove it "
                          f"{SKIP_HINT}")
    return Preference(prompt, chosen, rejected, src)


def _chat_to_prompt(chat: Chat) -> Prompt:
    """An SFT conversation as a prompt: the turns before its final answer; that answer becomes the reference."""
    msgs = chat.messages
    if msgs[-1]["role"] != "assistant" or len(msgs) < 2:
        return Prompt(msgs, {}, chat.source)
    return Prompt(msgs[:-1], {"answer": msgs[-1]["content"]}, chat.source)


def _format_for(kind: str, data: dict) -> str | None:
    if "__invalid__" in data:
        return None
    if kind == "prompt" and ("prompt" in data or "messages" in data):
        return "prompt"  # any record with a prompt can seed generation; other fields ride along
    return detect_format(data)


def _missing_hint(kind: str, data: dict) -> str:
    """For a record that is almost of the wanted kind: which field it lacks."""
    needed = {"preference": ("chosen", "rejected"), "unpaired": ("completion", "label")}.get(kind, ())
    missing = [k for k in needed if k not in data]
    return f" (it has no {' or '.join(repr(k) for k in missing)} field)" if missing and len(missing) < len(needed) else ""


def normalize_all(records: Iterable[Record], kind: str, *, fmt: str | None = None, skip_invalid: bool = False) -> Normalized:
    """Normalize records for ``kind`` in {"sft", "preference", "unpaired", "prompt"}; log a format summary.

    ``fmt`` names the format explicitly instead of detecting it per record. Invalid records raise
    (the first one) unless ``skip_invalid``, which counts and reports them instead.
    """
    allowed = {
        "sft": (Chat, Text),
        "preference": (Preference,),
        "unpaired": (Unpaired,),
        "prompt": (Prompt,),
    }[kind]
    out = Normalized()
    for record in records:
        record_fmt = fmt or _format_for(kind, record.data)
        try:
            example = normalize(record, record_fmt)
            if kind == "prompt" and isinstance(example, Chat):
                example = _chat_to_prompt(example)
            if not isinstance(example, allowed):
                raise RecordError(f"{record.source}: a {record_fmt} record cannot be used for {kind} data"
                                  + _missing_hint(kind, record.data))
        except RecordError as err:
            if not skip_invalid:
                raise
            out.skipped.append(str(err))
            continue
        out.examples.append(example)
        out.formats[record_fmt] += 1
    if not out.examples:
        raise RecordError(f"no usable {kind} records ({out.summary()})")
    logger.info("%s records: %s", kind, out.summary())
    return out
