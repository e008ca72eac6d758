"""Read records from local files, directories, ``save_to_disk`` datasets or the hub; split them.

Every record keeps where it came from (``file:line`` or ``file: record N``), so a broken record
fails with a message that names it. Turning records into training examples is ``minift.data.formats``.
"""

from __future__ import annotations

import codecs
import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".txt", ".parquet")
VALIDATION_NAMES = ("validation", "valid", "val", "dev", "eval", "test")


class RecordError(ValueError):
    """A record that cannot be used; the message starts with where the record is."""


@dataclass
class Record:
    data: dict
    source: str  # "file.jsonl:12", "file.json: record 3", "hub:name[train] record 7"


def load_records(source: str | Path, split: str | None = None) -> list[Record]:
    """Records from a file, a directory of files, a ``save_to_disk`` dataset, or a hub dataset name.

    Directories: with ``split="train"`` files whose name mentions a validation word (``validation``,
    ``valid``, ``val``, ``dev``, ``eval``, ``test``) are left out; with ``split="validation"`` only those
    are read.
    """
    records = list(_iter_records(source, split))
    if not records:
        raise RecordError(f"{source} holds no records" + (f" for split {split!r}" if split else ""))
    return records


def _iter_records(source: str | Path, split: str | None) -> Iterator[Record]:
    path = Path(source).expanduser()
    if path.is_file():
        yield from _read_file(path)
    elif path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            yield from _read_saved_dataset(path, split)
            return
        files = _split_files(path, split)
        for file in files:
            yield from _read_file(file)
    elif str(source).startswith((".", "/", "~")) or Path(source).suffix in FILE_SUFFIXES:
        raise FileNotFoundError(f"dataset {source} does not exist")
    else:
        yield from _read_hub(str(source), split)


def _split_files(directory: Path, split: str | None) -> list[Path]:
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in FILE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{directory} has no data files ({', '.join(FILE_SUFFIXES)})")
    is_val = {p: any(w in p.stem.lower().replace("-", "_").split("_") for w in VALIDATION_NAMES) for p in files}
    if split in (None, "all"):
        return files
    if split == "train":
        return [p for p in files if not is_val[p]]
    if split in VALIDATION_NAMES:
        chosen = [p for p in files if is_val[p]]
        if not chosen:
            raise FileNotFoundError(f"{directory} has no validation file (a name with one of {VALIDATION_NAMES})")
        return chosen
    chosen = [p for p in files if split in p.stem]
    if not chosen:
        raise FileNotFoundError(f"{directory} has no file for split {split!r}")
    return chosen


def _read_file(path: Path) -> Iterator[Record]:
    suffix = path.suffix.lower()
    if path.stat().st_size == 0:
        raise RecordError(f"{path} is empty")
    if suffix == ".jsonl":
        yield from _read_jsonl(path)
    elif suffix == ".json":
        yield from _read_json(path)
    elif suffix in (".csv", ".tsv"):
        yield from _read_csv(path, "\t" if suffix == ".tsv" else ",")
    elif suffix == ".txt":  # one record per line; Windows line ends read as plain ones
        for lineno, line, error in _lines(path):
            text = line.rstrip("\n").removesuffix("\r").replace("\r", "\n")
            if error or text.strip():
                yield Record({"__invalid__": error} if error else {"text": text}, f"{path}:{lineno}")
    elif suffix == ".parquet":
        yield from _read_parquet(path)
    else:
        raise RecordError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(FILE_SUFFIXES)}")


def _lines(path: Path) -> Iterator[tuple[int, str, str | None]]:
    """(line number, text, error): a line that is not UTF-8 (its text decoded with replacement characters) or
    holds a NUL byte comes with the reason. A UTF-8 byte-order mark (Excel's "CSV UTF-8", Notepad) is dropped."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            try:
                text, error = raw.decode("utf-8"), None
            except UnicodeDecodeError as err:
                text = raw.decode("utf-8", errors="replace")
                error = f"not valid UTF-8 ({err.reason} at byte {err.start}); re-encode the file as UTF-8"
            if error is None and "\0" in text:
                error = f"a NUL byte at column {text.index(chr(0)) + 1} (binary data, or a UTF-16 file?)"
            yield lineno, text, error


def _read_jsonl(path: Path) -> Iterator[Record]:
    for lineno, line, error in _lines(path):
        where = f"{path}:{lineno}"
        if error:
            yield Record({"__invalid__": error}, where)
            continue
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as err:
            yield Record({"__invalid__": f"invalid JSON ({err.msg}, column {err.colno})"}, where)
            continue
        yield Record(data if isinstance(data, dict) else {"__invalid__": f"expected a JSON object, got {type(data).__name__}"}, where)


def _read_json(path: Path) -> Iterator[Record]:
    try:
        data = json.loads(path.read_bytes().removeprefix(codecs.BOM_UTF8).decode("utf-8"))
    except UnicodeDecodeError as err:
        raise RecordError(f"{path}: not valid UTF-8 ({err.reason} at byte {err.start})") from err
    except json.JSONDecodeError as err:
        raise RecordError(f"{path}:{err.lineno}: invalid JSON ({err.msg}, column {err.colno})") from err
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]} or {"train": [...]}
    if not isinstance(data, list):
        raise RecordError(f"{path}: expected a JSON list of records (or one key holding a list), got {type(data).__name__}")
    for i, item in enumerate(data):
        yield Record(item if isinstance(item, dict) else {"__invalid__": f"expected an object, got {type(item).__name__}"},
                     f"{path}: record {i}")


def _read_csv(path: Path, delimiter: str) -> Iterator[Record]:
    """Rows as records named by the line they start on (a quoted field may span lines); a row whose field count
    differs from the header's, or with a line that is not UTF-8, is an invalid record (skippable)."""
    damaged: dict[int, str] = {}

    def text_lines():
        for lineno, line, error in _lines(path):
            if error:
                damaged[lineno] = error
            yield line

    reader = csv.reader(text_lines(), delimiter=delimiter)
    try:
        header = next(reader)
        if damaged:
            raise RecordError(f"{path}:1: header: {next(iter(damaged.values()))}")
        start = reader.line_num + 1
        for row in reader:
            lines, where = range(start, reader.line_num + 1), f"{path}:{start}"
            start = reader.line_num + 1
            error = next((damaged[n] for n in lines if n in damaged), None)
            if error is None and not row:
                continue  # a blank line
            if error is None and len(row) != len(header):
                error = (f"{len(row)} field{'s' * (len(row) != 1)}, but the header has {len(header)} ({', '.join(header)}); quote a field "
                         f"that holds {delimiter!r}")
            yield Record({"__invalid__": error} if error else {k: v for k, v in zip(header, row) if v != ""}, where)
    except csv.Error as err:
        raise RecordError(f"{path}:{reader.line_num}: {err}") from err


def _read_parquet(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    index = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield Record(row, f"{path}: row {index}")
            index += 1


def _read_saved_dataset(path: Path, split: str | None) -> Iterator[Record]:
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        name = split or "train"
        if name not in ds:
            raise ValueError(f"{path} has splits {list(ds)}, not {name!r}")
        ds = ds[name]
    for i, row in enumerate(ds):
        yield Record(dict(row), f"{path}: record {i}")


def _read_hub(name: str, split: str | None) -> Iterator[Record]:
    from datasets import load_dataset

    try:
        ds = load_dataset(name, split=split or "train", streaming=True)
    except Exception as err:  # datasets raises many types; say what was tried
        raise FileNotFoundError(f"{name!r} is neither a local path nor a loadable hub dataset: {err}") from err
    for i, row in enumerate(ds):
        yield Record(dict(row), f"hub:{name}[{split or 'train'}] record {i}")


def split_records(records: list, validation_split: float, seed: int) -> tuple[list, list]:
    """A deterministic train/validation split: the same records, fraction and seed give the same split."""
    if not 0.0 <= validation_split < 1.0:
        raise ValueError(f"validation_split must be in [0, 1), got {validation_split}")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = int(round(len(records) * validation_split))
    if validation_split > 0 and n_val == 0:
        n_val = 1
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return [records[i] for i in train], [records[i] for i in val]


def train_eval_records(dataset: str, eval_dataset: str | None, validation_split: float, seed: int) -> dict[str, list]:
    """``{"train": ..., "eval": ...}``: ``eval_dataset`` when given (a file, or a directory's validation
    files), else a deterministic ``validation_split`` share of ``dataset``."""
    records = load_records(dataset, "train")
    if eval_dataset:
        return {"train": records, "eval": load_records(eval_dataset, "validation")}
    return dict(zip(("train", "eval"), split_records(records, validation_split, seed)))
