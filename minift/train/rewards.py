"""Rewards for online RL, behind one signature, checked on every call.

    reward(prompts, completions, **fields) -> list[float | None]

``prompts[k]`` is completion ``k``'s prompt as the record gave it (a string or a list of messages; a prompt
with G completions appears G times, prompt-major), ``completions[k]`` its text. Keyword fields: ``completion_ids``
(token ids) and every column of the prompt records (``answer``, ...), each a list aligned with ``completions``.
A function receives only the fields it names, unless it takes ``**fields``. ``None`` means "does not apply":
left out of that reward's mean, and adding nothing to the weighted total.

A reward is given as a bundled name (:data:`BUNDLED`), ``module:function`` or ``path/to/file.py:function``, or
the directory of a sequence-classification model (:class:`RewardModel`: the score at the last token).
Parameters a function names without a default (``answer`` for ``exact_match``) are fields every prompt record
must have: :meth:`Rewards.check_records` names the record (file:line) that lacks one, before training starts.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import math
import re
from pathlib import Path
from typing import Callable

import torch

from minift.config import ConfigError
from minift.data.read import Record, RecordError

CALL_ARGS = ("prompts", "completions", "completion_ids")


def exact_match(prompts, completions, answer, **_) -> list[float]:
    """1 when the completion, stripped, equals the record's ``answer``, else 0 (the demo's greedy metric)."""
    return [float(c.strip() == str(a).strip()) for c, a in zip(completions, answer)]


def partial_credit(prompts, completions, answer, **_) -> list[float]:
    """The share of positions whose word equals the answer's, over the longer of the two word lists."""
    scores = []
    for c, a in zip(completions, answer):
        got, want = c.split(), str(a).split()
        scores.append(sum(x == y for x, y in zip(got, want)) / max(len(got), len(want), 1))
    return scores


_THINK = re.compile(r"\s*<think>.*?</think>\s*\S.*", re.S)


def think_format(prompts, completions, **_) -> list[float]:
    """1 when the completion is ``<think>...</think>`` followed by an answer (DeepSeek-R1's format), else 0."""
    return [float(bool(_THINK.fullmatch(c))) for c in completions]


def length_penalty(prompts, completions, completion_ids, *, max_completion_length: int, **_) -> list[float]:
    """DAPO's soft overlong punishment (Yu et al. 2025, 2503.14476): 0 up to ``L − L/4`` tokens, then falling
    linearly to −1 at ``L = max_completion_length``."""
    cache = max(1, max_completion_length // 4)
    start = max_completion_length - cache
    return [max(-1.0, min(0.0, (start - len(ids)) / cache)) for ids in completion_ids]


BUNDLED: dict[str, Callable] = {"exact_match": exact_match, "partial_credit": partial_credit,
                                "think_format": think_format, "length_penalty": length_penalty}


def reward_text(tokenizer, prompt, completion) -> str:
    """What a reward model scores: prompt (a string is one user turn, or messages) and completion (a string is
    one assistant turn, or messages) through the tokenizer's chat template, or concatenated without one. The
    reward-model recipe trains on exactly this text."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    answer = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else list(completion)
    if not tokenizer.chat_template:
        return "".join(m["content"] for m in messages + answer)
    return tokenizer.apply_chat_template(messages + answer, tokenize=False)


class RewardModel:
    """A sequence-classification model directory (one label) as a reward: the score of prompt + completion at
    its last token, the prompt rendered with the model's chat template (a string prompt as one user turn)."""

    def __init__(self, path: str | Path, *, device: str | torch.device = "cpu", batch_size: int = 16):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()
        if self.model.config.num_labels != 1:
            raise ConfigError(f"{path}: a reward model has one output (num_labels=1), this one has "
                             f"{self.model.config.num_labels}")
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device, self.batch_size = device, batch_size
        self.__name__ = f"reward_model({Path(path).name})"

    @torch.inference_mode()
    def __call__(self, prompts, completions, **_) -> list[float]:
        texts = [reward_text(self.tokenizer, p, c) for p, c in zip(prompts, completions)]
        scores: list[float] = []
        for at in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[at: at + self.batch_size], return_tensors="pt", padding=True,
                                   add_special_tokens=False)
            ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
            logits = self.model(input_ids=ids, attention_mask=mask).logits  # HF scores the last non-pad token
            scores += logits[:, 0].float().tolist()
        return scores


def load_reward(spec: str, *, max_completion_length: int | None = None) -> tuple[str, Callable]:
    """``(name, function)`` for a bundled name, a reward-model directory, or ``module:function``."""
    if spec in BUNDLED:
        if BUNDLED[spec] is not length_penalty:
            return spec, BUNDLED[spec]
        if not max_completion_length:
            raise ConfigError("the length_penalty reward needs max_completion_length (the recipe's max_new_tokens)")
        return spec, functools.partial(length_penalty, max_completion_length=max_completion_length)
    if Path(spec).is_dir():
        if not (Path(spec) / "config.json").is_file():
            raise ConfigError(f"reward {spec}: a directory must hold a sequence-classification model (config.json)")
        return Path(spec).name, RewardModel(spec)
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"reward {spec!r}: use a bundled name ({', '.join(BUNDLED)}), a reward-model directory, "
                         f"or module:function / path/to/file.py:function")
    try:
        if module_name.endswith(".py"):
            loader = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            if loader is None or not Path(module_name).is_file():
                raise FileNotFoundError(f"no file {module_name}")
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except Exception as err:
        raise ConfigError(f"reward {spec}: cannot import {module_name}: {type(err).__name__}: {err}") from err
    fn = getattr(module, attr, None)
    if not callable(fn):
        names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ConfigError(f"reward {spec}: {module_name} has no function {attr!r}; it has: {', '.join(names)}")
    _check_signature(attr, fn)
    return attr, fn


def accepted_keywords(fn: Callable) -> set[str] | None:
    """The keyword arguments ``fn`` takes; None when it takes ``**fields`` (every field is passed)."""
    params = inspect.signature(fn).parameters
    return None if any(p.kind is p.VAR_KEYWORD for p in params.values()) else set(params)


def _check_signature(name: str, fn: Callable) -> None:
    accepted = accepted_keywords(fn)
    if accepted is not None and not {"prompts", "completions"} <= accepted:
        raise ConfigError(f"reward {name}{inspect.signature(fn)}: a reward is called as "
                         f"{name}(prompts=..., completions=..., **fields) and must accept prompts and completions")


def required_fields(fn: Callable) -> tuple[str, ...]:
    """The record fields ``fn`` needs: parameters without a default beyond prompts / completions / completion_ids."""
    return tuple(n for n, p in inspect.signature(fn).parameters.items()
                 if n not in CALL_ARGS and p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


class RewardError(ValueError):
    """A reward function failed or returned something unusable; the message names it and the prompt."""


class Rewards:
    """Several rewards with weights: ``rewards(prompts, completions, completion_ids, fields, group_size)`` returns
    the weighted total ``(B,)`` and each reward's values; :meth:`metrics` gives their means and stds."""

    def __init__(self, functions: list[tuple[str, Callable]], weights: list[float] | None = None):
        if not functions:
            raise ValueError("at least one reward is needed")
        weights = [1.0] * len(functions) if weights is None else list(weights)
        if len(weights) != len(functions):
            raise ValueError(f"{len(weights)} reward weights for {len(functions)} rewards: give one weight per reward")
        self.functions, self.weights = functions, weights
        self.accepted = {name: accepted_keywords(fn) for name, fn in functions}

    def check_records(self, records: list[Record]) -> None:
        """Every record has every field a reward needs, else a RecordError naming the record and the reward."""
        for name, fn in self.functions:
            for field in required_fields(fn):
                for record in records:
                    if field not in record.data:
                        raise RecordError(f"{record.source}: the reward {name} needs the field {field!r}, which this "
                                          f"record lacks (it has: {', '.join(record.data)})")

    def __call__(self, prompts: list, completions: list[str], completion_ids: list[list[int]],
                 fields: dict[str, list], group_size: int) -> tuple[torch.Tensor, dict[str, list[float | None]]]:
        values = {name: self._call(name, fn, prompts, completions, completion_ids, fields, group_size)
                  for name, fn in self.functions}
        total = [sum(w * v[k] for w, v in zip(self.weights, values.values()) if v[k] is not None)
                 for k in range(len(completions))]
        return torch.tensor(total, dtype=torch.float32), values

    def _call(self, name, fn, prompts, completions, completion_ids, fields, group_size) -> list[float | None]:
        accepted = self.accepted[name]
        offered = {"prompts": prompts, "completions": completions, "completion_ids": completion_ids, **fields}
        kwargs = {k: v for k, v in offered.items() if accepted is None or k in accepted}

        def where(k: int) -> str:
            return f"prompt {k // group_size} (completion {k % group_size})"

        try:
            out = fn(**kwargs)
        except Exception as err:
            bad = _first_failure(fn, kwargs, len(completions))
            at = f" at {where(bad)}" if bad is not None else ""
            raise RewardError(f"reward {name} raised {type(err).__name__}: {err}{at}") from err
        if not isinstance(out, (list, tuple)):
            raise RewardError(f"reward {name} returned {type(out).__name__}; it must return a list of floats (or None), "
                              f"one per completion")
        if len(out) != len(completions):
            raise RewardError(f"reward {name} returned {len(out)} values for {len(completions)} completions")
        for k, v in enumerate(out):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise RewardError(f"reward {name} returned {type(v).__name__} {v!r} at {where(k)}: use a float or None")
            if v is not None and not math.isfinite(v):
                raise RewardError(f"reward {name} returned {v} at {where(k)}: rewards must be finite (None: not "
                                  f"applicable)")
        return [None if v is None else float(v) for v in out]

    @staticmethod
    def metrics(total: torch.Tensor, values: dict[str, list[float | None]]) -> dict[str, float]:
        """The total's mean and std, and each reward's over the completions it applied to (0 when none did): the
        same keys on every call, so batches' metrics line up."""
        out = {"reward": total.mean().item(), "reward_std": total.std().item() if total.numel() > 1 else 0.0}
        for name, vs in values.items():
            got = torch.tensor([v for v in vs if v is not None])
            out[f"rewards/{name}/mean"] = got.mean().item() if got.numel() else 0.0
            out[f"rewards/{name}/std"] = got.std().item() if got.numel() > 1 else 0.0
        return out


def _first_failure(fn: Callable, kwargs: dict, count: int) -> int | None:
    """The first completion on which ``fn``, called with that completion alone, raises (None if none does)."""
    for k in range(count):
        try:
            fn(**{key: value[k: k + 1] if isinstance(value, list) else value for key, value in kwargs.items()})
        except Exception:
            return k
    return None
