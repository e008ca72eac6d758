"""Generation with named adapters: one base model in memory, any number of adapters, one active at a time.

    gen = Generator.load("tiny", {"sft": "out/sft_dpo/sft/adapter"})
    [c] = gen.generate(["Reverse the words: red cup"], SamplingParams(max_new_tokens=16), adapter="sft")
    print(c.text)

Switching adapters only changes which adapters the LoRA layers skip; the base is never reloaded. ``merge=True``
folds the active adapter into the base weights for speed (unmerged again before switching). Sampling is
:func:`minift.train.sampling.sample`, the same engine the recipes' evaluations and rollouts use.
"""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path
from typing import Callable, Iterator

from minift.data.encode import set_chat_template
from minift.lora.adapters import load_adapter
from minift.lora.layers import adapter_configs, disable_adapters, remove_adapter
from minift.lora.merge import merge_lora, unmerge_lora
from minift.model.load import load_model_and_tokenizer
from minift.train.sampling import Completion, SamplingParams, sample

logger = logging.getLogger(__name__)

BASE = "base"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def parse_adapter_specs(specs: list[str]) -> dict[str, str]:
    """``["sft=out/sft/adapter", "out/dpo/adapter"]`` -> ``{"sft": ..., "adapter": ...}`` (a bare directory is
    named after itself, or its parent when it is called ``adapter``), checking each directory exists."""
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            path = spec
            folder = Path(spec.rstrip("/"))
            name = folder.parent.name if folder.name == "adapter" and folder.parent.name else folder.name
        if not (Path(path) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"--adapter {spec}: {path} holds no adapter_config.json; pass NAME=DIR with the "
                                    f"directory a recipe wrote (e.g. out/sft/adapter)")
        if name in adapters or name == BASE:
            raise ValueError(f"--adapter {spec}: the name {name!r} is {'reserved for the base model' if name == BASE else 'used twice'}")
        adapters[name] = path
    return adapters


class Generator:
    """A causal LM and its tokenizer with named adapters; :meth:`generate` runs with one of them active."""

    def __init__(self, model, tokenizer, *, merge: bool = False):
        self.model, self.tokenizer, self.merge = model, tokenizer, merge
        self.paths: dict[str, str] = {}
        self.merged: str | None = None
        if not tokenizer.chat_template:
            set_chat_template(tokenizer)

    @classmethod
    def load(cls, model_name_or_path: str, adapters: dict[str, str] | None = None, *, dtype: str = "float32",
             device: str | None = None, merge: bool = False, chat_template: str | None = None) -> "Generator":
        """The base from a directory, hub id or ``tiny``, then each adapter under its name."""
        model, tokenizer = load_model_and_tokenizer(model_name_or_path, dtype=dtype)
        if device:
            model.to(device)
        if chat_template:
            set_chat_template(tokenizer, chat_template)
        gen = cls(model, tokenizer, merge=merge)
        for name, path in (adapters or {}).items():
            gen.add_adapter(name, path)
        return gen

    @property
    def names(self) -> list[str]:
        """``base`` then the adapters, in the order they were added."""
        return [BASE, *self.paths]

    def add_adapter(self, name: str, path: str | Path) -> None:
        """Load the PEFT-format adapter in ``path`` as ``name``; refused for a different base model."""
        if not _NAME.fullmatch(name) or name == BASE:
            raise ValueError(f"adapter name {name!r}: use letters, digits and . _ : - (not {BASE!r}), at most 128")
        if name in self.paths:
            raise ValueError(f"an adapter named {name!r} is already loaded (from {self.paths[name]}); unload it first")
        self._unmerge()
        load_adapter(self.model, path, adapter_name=name)
        self.paths[name] = str(path)
        logger.info("adapter %s loaded from %s", name, path)

    def remove_adapter(self, name: str) -> None:
        self._check(name)
        if name == BASE:
            raise ValueError("the base model cannot be unloaded")
        self._unmerge()
        remove_adapter(self.model, name)
        del self.paths[name]

    def _check(self, name: str) -> None:
        if name not in self.names:
            raise ValueError(f"no model or adapter named {name!r}; loaded: {', '.join(self.names)}")

    def _unmerge(self) -> None:
        if self.merged:
            unmerge_lora(self.model)
            self.merged = None

    def render(self, prompt: str | list[dict], *, chat: bool = True) -> list[int]:
        """Token ids of a prompt: a conversation (list of messages) or a text, which ``chat`` wraps as one user
        turn of the chat template (as the recipes train prompts); ``chat=False`` uses the text as it is."""
        if isinstance(prompt, str) and not chat:
            return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(self, prompts: list[str | list[dict] | list[int]], params: SamplingParams | list[SamplingParams], *,
                 adapter: str = BASE, chat: bool = True, n: int = 1,
                 on_text: Callable[[int, str, Completion | None], None] | None = None) -> list[Completion]:
        """Completions of ``prompts`` (texts, conversations, or token id lists used as given) with ``adapter``
        active and every other adapter off; see :func:`~minift.train.sampling.sample` for ``n`` and ``on_text``."""
        ids = [p if p and isinstance(p[0], int) else self.render(p, chat=chat) for p in prompts]
        with self.active(adapter):
            return sample(self.model, self.tokenizer, ids, params, n=n, on_text=on_text)

    @contextlib.contextmanager
    def active(self, adapter: str = BASE) -> Iterator[None]:
        """Within the block the model runs with ``adapter`` on and every other adapter off (in merge mode
        ``adapter`` is merged into the base weights, and unmerged when another one is used)."""
        self._check(adapter)
        if self.merged and self.merged != adapter:
            self._unmerge()
        if self.merge and adapter != BASE and self.merged != adapter:
            merge_lora(self.model, [adapter])
            self.merged = adapter
        with disable_adapters(self.model, [a for a in adapter_configs(self.model) if a != adapter]):
            yield
