"""Render normalized examples with the chat template and tokenize them with exact label masks.

Labels are ``-100`` where no loss is taken. Conversations train on assistant turns only (every one
of them, in multi-turn chats), found without ``{% generation %}`` markers: each message's content
is located in order in the rendered text, and an assistant span runs from its content through the
end-of-turn token. Templates that rewrite message content fall back to rendering prefixes of the
conversation. ``text`` examples train on everything. EOS is appended where the template does not
end the last turn. Truncation is never silent: it is counted, and an example left with nothing to
train on is dropped and counted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from minift.constants import IGNORE_INDEX
from minift.data.formats import Chat, Preference, Prompt, Text, Unpaired
from minift.data.read import RecordError

logger = logging.getLogger(__name__)


# ChatML-style; also minift's documented default for tokenizers without a template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class EncodeReport:
    """What encoding did to the examples; logged by recipes and written to run.json."""

    examples: int = 0
    kept: int = 0
    truncated: int = 0  # cut to max_seq_length (still trained on what is left)
    dropped_too_long: int = 0  # truncation="drop"
    dropped_no_target: int = 0  # nothing left to train on (e.g. the completion was cut away)
    tokens: int = 0
    trained_tokens: int = 0

    def __str__(self) -> str:
        text = (f"{self.kept}/{self.examples} examples, {self.tokens:,} tokens ({self.trained_tokens:,} trained); "
                f"truncated {self.truncated}")
        if self.dropped_too_long:
            text += f", dropped as too long {self.dropped_too_long}"
        if self.dropped_no_target:
            text += f", dropped with nothing to train on {self.dropped_no_target}"
        return text


def read_chat_template(chat_template_file: str | Path) -> str:
    """The text of a Jinja chat template file, parsed as transformers will: a syntax error names the file's line."""
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from minift.config import ConfigError, read_text_file

    path = Path(chat_template_file).expanduser()
    text = read_text_file(path, "chat template file")
    try:
        ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"]).parse(text)
    except TemplateSyntaxError as err:
        raise ConfigError(f"{path}:{err.lineno}: chat template syntax error: {err.message}") from None
    return text


def set_chat_template(tokenizer, chat_template_file: str | Path | None = None) -> None:
    """Use ``chat_template_file`` if given; else keep the tokenizer's; else minift's ChatML default (warned)."""
    if chat_template_file:
        tokenizer.chat_template = read_chat_template(chat_template_file)
    elif not tokenizer.chat_template:
        logger.warning("the tokenizer has no chat template; using minift's ChatML default "
                       "(<|im_start|>role\\ncontent<|im_end|>). Pass --chat_template FILE to choose another.")
        tokenizer.chat_template = CHATML_TEMPLATE


def _render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _turn_end(text: str, content_end: int, limit: int, eos: str) -> int:
    """A trained turn ends right after its end-of-turn token when there is one before ``limit``."""
    j = text.find(eos, content_end, limit)
    return j + len(eos) if j >= 0 and not text[content_end:j].strip() else content_end


def _assistant_header(tokenizer) -> str:
    """The text the template puts before an assistant reply (what add_generation_prompt appends)."""
    probe = [{"role": "user", "content": "x"}]
    with_prompt = _render(tokenizer, probe, generation_prompt=True)
    return with_prompt[len(_render(tokenizer, probe)):]


def render_with_spans(tokenizer, messages: list[dict], trained: list[bool], source: str,
                      text: str | None = None, header: str | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans ``[start, end)`` that carry loss.

    Fast path: find each message's content in order and accept a trained turn only where the
    assistant header sits right before it. Otherwise render growing prefixes of the conversation
    (exact for any template that renders a prefix as a prefix). ``text``/``header`` may be passed
    in when the caller rendered a batch at once.
    """
    text = _render(tokenizer, messages) if text is None else text
    header = _assistant_header(tokenizer) if header is None else header
    eos = tokenizer.eos_token
    starts, cursor = [], 0
    for msg, is_trained in zip(messages, trained):
        at = text.find(msg["content"], cursor)
        if at < 0 or (is_trained and not text.endswith(header, 0, at)):
            break
        starts.append(at)
        cursor = at + len(msg["content"])
    spans = []
    if len(starts) == len(messages):
        for i, (msg, is_trained) in enumerate(zip(messages, trained)):
            if is_trained:
                limit = starts[i + 1] if i + 1 < len(messages) else len(text)
                spans.append((starts[i], _turn_end(text, starts[i] + len(msg["content"]), limit, eos)))
        return _end_with_eos(text, spans, trained, eos)
    for i, is_trained in enumerate(trained):
        if not is_trained:
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1])
        if not (upto.startswith(before) and text.startswith(upto)):
            raise RecordError(f"{source}: the chat template renders turn {i} differently depending on what follows, "
                              f"so its loss mask cannot be computed; pass a simpler --chat_template")
        j = upto.find(eos, len(before))
        spans.append((len(before), j + len(eos) if j >= 0 else len(upto.rstrip())))
    return _end_with_eos(text, spans, trained, eos)


def _render_all(tokenizer, conversations: list[list[dict]], trained: list[list[bool]], sources: list[str]):
    """Render many conversations in one apply_chat_template call (far less overhead), then find spans."""
    if not conversations:
        return []
    texts = tokenizer.apply_chat_template(conversations, tokenize=False)
    header = _assistant_header(tokenizer)
    return [render_with_spans(tokenizer, m, t, src, text, header)
            for m, t, src, text in zip(conversations, trained, sources, texts)]


def _end_with_eos(text: str, spans: list[tuple[int, int]], trained: list[bool], eos: str):
    """If the template does not end the final trained turn with EOS, insert one (trained) after it."""
    if not spans or not trained[-1] or text[: spans[-1][1]].endswith(eos):
        return text, spans
    s, e = spans[-1]
    return text[:e] + eos + text[e:], spans[:-1] + [(s, e + len(eos))]


def _span_tokens(encoding, start: int, end: int) -> tuple[int, int]:
    """Token range ``[t0, t1)`` of the tokens overlapping characters ``[start, end)`` (a token such as
    ' dog' may begin with the separator just before the span: it is trained)."""
    t0 = next((t for c in range(start, end) if (t := encoding.char_to_token(c)) is not None), None)
    if t0 is None:
        return 0, 0
    t1 = next(t for c in range(end - 1, start - 1, -1) if (t := encoding.char_to_token(c)) is not None)
    return t0, t1 + 1


def _backend(tokenizer):
    """The Rust tokenizer (character offsets, batch encoding), with no truncation or padding of its own."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{type(tokenizer).__name__} has no fast (tokenizers) backend; minift needs one to "
                         f"compute label masks from character offsets")
    if backend.truncation or backend.padding:  # never cut or pad silently: work on an unconfigured copy
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(backend.to_str())
        backend.no_truncation()
        backend.no_padding()
    return backend


class _Encoder:
    """Shared batching, EOS handling and truncation accounting for the encode_* functions."""

    def __init__(self, tokenizer, max_seq_length: int, truncation: str, train_on: str):
        if truncation not in ("truncate", "drop"):
            raise ValueError(f"truncation must be 'truncate' or 'drop', got {truncation!r}")
        if train_on not in ("completion", "all"):
            raise ValueError(f"train_on must be 'completion' or 'all', got {train_on!r}")
        if max_seq_length <= 1:
            raise ValueError(f"max_seq_length must be > 1, got {max_seq_length}")
        set_chat_template(tokenizer)  # a no-op when the tokenizer has a template
        self.max_len, self.truncation, self.train_on = max_seq_length, truncation, train_on
        self.backend = _backend(tokenizer)
        self.report = EncodeReport()

    def encode(self, texts: list[str], spans: list[list[tuple[int, int]] | None]) -> list[tuple[list[int], list[int]] | None]:
        """Tokenize rendered texts; ``spans=None`` means train on everything. None marks a dropped example."""
        out = []
        for encoding, span in zip(self.backend.encode_batch(texts, add_special_tokens=False), spans):
            self.report.examples += 1
            ids = encoding.ids
            if span is None or self.train_on == "all":
                labels = list(ids)
            else:
                labels = [IGNORE_INDEX] * len(ids)
                for start, end in span:
                    t0, t1 = _span_tokens(encoding, start, end)
                    labels[t0:t1] = ids[t0:t1]
            out.append(self._fit(ids, labels))
        return out

    def _fit(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]] | None:
        if len(ids) > self.max_len:
            if self.truncation == "drop":
                self.report.dropped_too_long += 1
                return None
            ids, labels = ids[: self.max_len], labels[: self.max_len]
            self.report.truncated += 1
        # label 0 is never a target (nothing precedes it)
        trained = len(labels) - labels.count(IGNORE_INDEX) - (labels[0] != IGNORE_INDEX)
        if trained == 0:
            self.report.dropped_no_target += 1
            return None
        self.report.kept += 1
        self.report.tokens += len(ids)
        self.report.trained_tokens += trained
        return ids, labels

    def log(self, what: str) -> None:
        logger.info("%s: %s", what, self.report)
        if self.report.truncated or self.report.dropped_too_long or self.report.dropped_no_target:
            logger.warning("%s: %d truncated, %d dropped as too long, %d dropped with nothing to train on "
                           "(max_seq_length=%d)", what, self.report.truncated, self.report.dropped_too_long,
                           self.report.dropped_no_target, self.max_len)


def encode_sft(examples: list[Chat | Text], tokenizer, *, max_seq_length: int, train_on: str = "completion",
               truncation: str = "truncate", chunk_size: int = 2048) -> tuple[list[dict], EncodeReport]:
    """SFT examples -> ``{"input_ids", "labels"}`` lists, plus the report of what was cut or dropped."""
    enc = _Encoder(tokenizer, max_seq_length, truncation, train_on)
    out = []
    for start in range(0, len(examples), chunk_size):
        chunk = examples[start: start + chunk_size]
        chats = [ex for ex in chunk if isinstance(ex, Chat)]
        rendered = iter(_render_all(tokenizer, [ex.messages for ex in chats],
                                    [[m["role"] == "assistant" for m in ex.messages] for ex in chats],
                                    [ex.source for ex in chats]))
        texts, spans = [], []
        for ex in chunk:
            if isinstance(ex, Text):
                texts.append(ex.text + tokenizer.eos_token)  # documents end with EOS, so packed ones stay apart
                spans.append(None)
            else:
                text, span = next(rendered)
                texts.append(text)
                spans.append(span)
        for item in enc.encode(texts, spans):
            if item is not None:
                out.append({"input_ids": item[0], "labels": item[1]})
    enc.log("sft data")
    return out, enc.report


def show_trained(tokenizer, input_ids: list[int], labels: list[int], limit: int = 1200) -> str:
    """An encoded example as text with its trained tokens between ``[[`` and ``]]`` (what ``--dry_run`` shows),
    cut to ``limit`` characters."""
    parts, start = [], 0
    for i in range(1, len(input_ids) + 1):
        if i == len(input_ids) or (labels[i] == IGNORE_INDEX) != (labels[start] == IGNORE_INDEX):
            text = tokenizer.decode(input_ids[start:i])
            parts.append(text if labels[start] == IGNORE_INDEX else f"[[{text}]]")
            start = i
    text = "".join(parts)
    return text if len(text) <= limit else text[:limit] + f" ... ({len(text) - limit:,} more characters)"


def encode_preferences(examples: list[Preference], tokenizer, *, max_seq_length: int,
                       truncation: str = "truncate") -> tuple[list[dict], EncodeReport]:
    """Pairs -> ``chosen_input_ids/labels`` and ``rejected_input_ids/labels`` (loss on the responses only)."""
    enc = _Encoder(tokenizer, max_seq_length, truncation, "completion")
    convs = [ex.prompt + side for ex in examples for side in (ex.chosen, ex.rejected)]
    trained = [[i >= len(ex.prompt) for i in range(len(ex.prompt) + len(side))]
               for ex in examples for side in (ex.chosen, ex.rejected)]
    rendered = _render_all(tokenizer, convs, trained, [ex.source for ex in examples for _ in range(2)])
    encoded = enc.encode([t for t, _ in rendered], [s for _, s in rendered])
    out = []
    for chosen, rejected in zip(encoded[0::2], encoded[1::2]):
        if chosen is None or rejected is None:
            continue  # a pair needs both sides; the side that failed is already counted
        out.append({"chosen_input_ids": chosen[0], "chosen_labels": chosen[1],
                    "rejected_input_ids": rejected[0], "rejected_labels": rejected[1]})
    enc.log("preference data")
    return out, enc.report


def encode_unpaired(examples: list[Unpaired], tokenizer, *, max_seq_length: int,
                    truncation: str = "truncate") -> tuple[list[dict], EncodeReport]:
    """KTO-style examples -> ``{"input_ids", "labels", "label"}``."""
    enc = _Encoder(tokenizer, max_seq_length, truncation, "completion")
    rendered = _render_all(tokenizer, [ex.prompt + ex.completion for ex in examples],
                           [[i >= len(ex.prompt) for i in range(len(ex.prompt) + len(ex.completion))] for ex in examples],
                           [ex.source for ex in examples])
    encoded = enc.encode([t for t, _ in rendered], [s for _, s in rendered])
    out = [{"input_ids": item[0], "labels": item[1], "label": ex.label}
           for ex, item in zip(examples, encoded) if item is not None]
    enc.log("unpaired data")
    return out, enc.report


def encode_prompts(examples: list[Prompt], tokenizer, *, max_prompt_length: int) -> tuple[list[dict], EncodeReport]:
    """Prompts for generation -> ``{"input_ids", "prompt", **extra}``; over-long prompts are dropped and counted."""
    if not tokenizer.chat_template:
        set_chat_template(tokenizer)
    report = EncodeReport()
    texts = (tokenizer.apply_chat_template([ex.messages for ex in examples], tokenize=False, add_generation_prompt=True)
             if examples else [])
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    out = []
    for ex, text, row in zip(examples, texts, ids):
        report.examples += 1
        if len(row) > max_prompt_length:
            report.dropped_too_long += 1
            continue
        report.kept += 1
        report.tokens += len(row)
        out.append({**ex.extra, "input_ids": list(row), "prompt": text})
    logger.info("prompt data: %s", report)
    if report.dropped_too_long:
        logger.warning("prompt data: %d prompts longer than max_prompt_length=%d were dropped",
                       report.dropped_too_long, max_prompt_length)
    return out, report
