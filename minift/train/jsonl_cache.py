"""A write-ahead cache of generated outputs (a teacher's answers, its rationales) in JSONL files, so that a killed
run, rerun, repeats no generation and no API call.

Each process appends to its own file (``name.jsonl`` for process 0, ``name.rank<r>.jsonl`` for the others) and
reads them all: keys are content hashes, so a rerun with another number of processes still finds every entry. A
line is flushed as soon as its output exists; a line cut by a kill is ignored on reading.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


def cache_key(*parts) -> str:
    """A stable key for JSON-serializable parts (e.g. the teacher, the prompt, the sample index)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class JsonlCache:
    """``key -> value`` (any JSON value) backed by ``path`` and its per-process siblings."""

    def __init__(self, path: str | Path, rank: int = 0):
        self.path = Path(path)
        self.own = self.path if rank == 0 else self.path.with_name(f"{self.path.stem}.rank{rank}{self.path.suffix}")
        self.entries: dict[str, object] = {}
        self.reload()
        if self.own.is_file() and self.own.stat().st_size:
            with open(self.own, "rb+") as f:  # a line cut by a kill: end it, so the next one starts clean
                f.seek(-1, 2)
                if f.read(1) != b"\n":
                    f.write(b"\n")

    def files(self) -> list[Path]:
        siblings = sorted(self.path.parent.glob(f"{self.path.stem}.rank*{self.path.suffix}"))
        return [p for p in [self.path, *siblings] if p.is_file()]

    def reload(self) -> None:
        """Read every process's file (after the others have written theirs)."""
        for file in self.files():
            with open(file, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    try:
                        entry = json.loads(line)
                        self.entries[entry["key"]] = entry["value"]
                    except (ValueError, KeyError, TypeError):
                        logger.warning("%s:%d: an unreadable cache line (cut by a kill?) is ignored", file, number)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def __getitem__(self, key: str):
        return self.entries[key]

    def add(self, key: str, value) -> None:
        """Store ``value`` and append it to this process's file at once."""
        self.entries[key] = value
        self.own.parent.mkdir(parents=True, exist_ok=True)
        with open(self.own, "a", encoding="utf-8") as f:
            f.write(json.dumps({"key": key, "value": value}, ensure_ascii=False) + "\n")

    def fill(self, keys: list[str], accelerator, produce, desc: str) -> int:
        """Make the values ``keys`` lack, each process a share: ``produce(positions, add)`` makes those of the given
        positions in ``keys`` and calls ``add(position, value)`` as each is ready (written down at once: a kill loses
        only what was in flight). The main process counts its share on a progress bar labelled ``desc``. Then every
        process reads every file. Returns how many values all processes made."""
        todo = [i for i, key in enumerate(keys) if key not in self][accelerator.process_index::accelerator.num_processes]
        if todo:
            # values may come in bursts (a sampled batch at a time): every one is drawn, so the count is never stale
            with tqdm(total=len(todo), desc=desc, disable=not accelerator.is_main_process, mininterval=0) as bar:
                def add(i: int, value) -> None:
                    self.add(keys[i], value)
                    bar.update()

                produce(todo, add)
        accelerator.wait_for_everyone()
        self.reload()
        return int(accelerator.reduce(torch.tensor(float(len(todo)), device=accelerator.device), "sum").item())
