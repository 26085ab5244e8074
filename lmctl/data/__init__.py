"""Load data with `datasets`, check its shape row by row, and fingerprint it.

Inputs (lmctl.data.sources): a .txt (one document per blank-line-separated paragraph),
.jsonl/.json, .csv, .parquet or .arrow file, a glob or directory of such shards, or a
`save_to_disk` directory. Rows stay in memory-mapped Arrow; checks walk them in batches.
Three record shapes (`data.format`, default auto-detected):
- text: a text column (`data.text_field`),
- completion: `prompt` and `completion` columns (loss on the completion only),
- chat: a `messages` column of {role, content} turns (loss on assistant turns only).
Problems are DataError (exit 2) naming the file, the row and the field.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lmctl.checkpoint import DataFingerprint
from lmctl.data.sources import Source, resolve
from lmctl.errors import DataError
from lmctl.home import cache_dir

Format = Literal["auto", "text", "completion", "chat"]
ROLES = ("system", "user", "assistant", "tool")
BATCH = 1000  # rows per batch when walking a data set


SMALL_JSONL_BYTES = 4 << 20  # below this a .jsonl is read with the json module: importing datasets costs seconds


def _small_jsonl(path: Path) -> list[dict[str, Any]] | None:
    """The rows of a small, regular .jsonl (every line an object, the same keys and value types
    in every row), exactly as datasets would return them; None for anything else, which then
    goes through datasets and gets its checks and messages."""
    import json

    if path.suffix.lower() != ".jsonl" or path.stat().st_size > SMALL_JSONL_BYTES:
        return None
    try:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except ValueError:
        return None
    if not rows or not all(isinstance(r, dict) and r.keys() == rows[0].keys() for r in rows):
        return None
    for key in rows[0]:
        kinds = {type(r[key]) for r in rows} - {type(None)}
        if len(kinds) > 1 or kinds & {dict, list, float}:  # arrow would unify or cast these: leave it to datasets
            return None
    return rows


@dataclass
class RowNamer:
    """Turns a row index of the (concatenated) dataset into `file: row N` (1-based, per shard)."""

    source: Source
    offsets: list[int] = field(default_factory=lambda: [0])

    def __call__(self, index: int) -> str:
        path, row = self.source.name_row(index, self.offsets)
        return f"{path}: row {row}"


def field_for(source: Source | Path, text_field: str) -> str:
    """The text column: a .txt file's paragraphs are always in "text"."""
    src = source if isinstance(source, Source) else resolve(source)
    return "text" if src.builder == "text" else text_field


def load_records(path: Path) -> Any:
    """The rows of `path` (file, glob, shard directory or saved dataset) as a memory-mapped `Dataset`."""
    return load_named(path)[0]


def load_named(path: Path) -> tuple[Any, RowNamer]:
    from lmctl.data.sources import load

    source = resolve(path)
    ds, offsets = load(source, cache_dir() / "datasets")
    return ds, RowNamer(source, offsets)


def detect_format(path: Path, records: Any, text_field: str, declared: Format = "auto") -> str:
    """The record shape: the declared one, else chat / completion / text by the columns present."""
    columns = set(records.column_names or next(iter(records)))  # a stream may not know its columns yet
    if declared != "auto":
        return declared
    if "messages" in columns:
        return "chat"
    if {"prompt", "completion"} <= columns:
        return "completion"
    if text_field in columns:
        return "text"
    raise DataError(f"{path}: no field {text_field!r}, no prompt/completion and no messages",
                    hint=f"columns are {sorted(columns)}; set data.text_field or data.format")


def _check_chat(where: str, messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of turns")
    for i, turn in enumerate(messages):
        if not isinstance(turn, dict) or turn.get("role") not in ROLES:
            raise DataError(f"{where}: field 'messages'[{i}].role must be one of {', '.join(ROLES)}")
        if not isinstance(turn.get("content"), str):
            raise DataError(f"{where}: field 'messages'[{i}].content must be a string")
    if not any(t["role"] == "assistant" for t in messages):
        raise DataError(f"{where}: field 'messages' has no assistant turn to learn from")


def check_batch(batch: dict[str, list[Any]], indices: list[int], fmt: str, text_field: str, name: RowNamer) -> None:
    """Raise DataError naming the first row of a columnar batch whose fields have the wrong shape."""
    if fmt == "chat":
        if "messages" not in batch:
            raise DataError(f"{name(indices[0])}: no field 'messages'")
        for index, messages in zip(indices, batch["messages"]):
            _check_chat(name(index), messages)
        return
    fields = ("prompt", "completion") if fmt == "completion" else (text_field,)
    for f in fields:
        if f not in batch:
            raise DataError(f"{name(indices[0])}: no field {f!r}")
        for index, value in zip(indices, batch[f]):
            if value is not None and not isinstance(value, str):
                raise DataError(f"{name(index)}: field {f!r} must be a string, got {type(value).__name__}")
    if fmt == "completion":
        for index, value in zip(indices, batch["completion"]):
            if not (value or "").strip():
                raise DataError(f"{name(index)}: field 'completion' is empty")


def batches(ds: Any) -> Iterator[tuple[dict[str, list[Any]], list[int]]]:
    """(columnar batch, row indices) over a dataset, without materialising it."""
    start = 0
    for batch in ds.iter(batch_size=BATCH):
        n = len(next(iter(batch.values())))
        yield batch, list(range(start, start + n))
        start += n


def check_rows(path: Path, records: Any, fmt: str, text_field: str, name: RowNamer | None = None) -> None:
    """Raise DataError naming the first row (1-based) whose fields have the wrong shape."""
    name = name or RowNamer(resolve(path))
    for batch, indices in batches(records):
        check_batch(batch, indices, fmt, text_field, name)


def load_checked(path: Path, text_field: str, declared: Format = "auto") -> tuple[Any, str, str]:
    """Read `path`, settle its record shape and check every row: (dataset, format, text field)."""
    records, name = load_named(path)
    text = field_for(name.source, text_field)
    fmt = detect_format(path, records, text, declared)
    check_rows(path, records, fmt, text, name)
    return records, fmt, text


def _texts_of(column: list[Any]) -> list[str]:
    return [t for t in column if isinstance(t, str) and t.strip()]


def small_texts(path: Path, text_field: str = "text") -> list[str] | None:
    """The non-empty documents of a small, regular .jsonl, read with the json module (eval then
    never imports datasets); None for any other input, which goes through datasets."""
    small = _small_jsonl(path) if path.is_file() else None
    if small is None:
        return None
    columns: dict[str, list[Any]] = {k: [r[k] for r in small] for k in small[0]}
    if text_field not in columns:
        raise DataError(f"{path}: no field {text_field!r}", hint=f"columns are {sorted(columns)}; set --text-field")
    check_batch(columns, list(range(len(small))), "text", text_field, RowNamer(resolve(path)))
    return _nonempty(path, text_field, _texts_of(columns[text_field]))


def _nonempty(path: Path, text_field: str, texts: list[str]) -> list[str]:
    if not texts:
        raise DataError(f"{path}: no non-empty text in field {text_field!r}")
    return texts


def check_text_field(path: Path, records: Any, text_field: str) -> None:
    if text_field not in records.column_names:
        raise DataError(f"{path}: no field {text_field!r}", hint=f"columns are {sorted(records.column_names)}; set --text-field")


def load_texts(path: Path, text_field: str = "text") -> list[str]:
    """The non-empty documents of a text-shaped file (for drift): a small .jsonl with the json
    module (`small_texts`), anything else through datasets in batches."""
    small = small_texts(path, text_field)
    if small is not None:
        return small
    records, name = load_named(path)
    text = field_for(name.source, text_field)
    check_text_field(path, records, text)
    check_rows(path, records, "text", text, name)
    return _nonempty(path, text, [t for batch in records.select_columns([text]).iter(batch_size=BATCH)
                                  for t in _texts_of(batch[text])])


def fingerprint(path: Path, text_field: str, rows: int, fmt: str = "text", source: Source | None = None,
                digest: Any = None) -> DataFingerprint:
    """sha256 over the bytes of every shard (sorted) plus how they were read; `digest` reuses
    a bytes digest already taken (Source.bytes_digest) instead of reading the files again."""
    digest = (digest or (source or resolve(path)).bytes_digest()).copy()
    digest.update(f"\0{text_field}\0{fmt}".encode())
    return DataFingerprint(path=location(path), sha256=digest.hexdigest(), rows=rows, text_field=text_field, format=fmt)


def location(path: Path) -> str:
    """Where data lives, as a record names it: the absolute path (a path relative to whatever
    directory lmctl ran in means nothing on a model card). The sha256 never includes it."""
    return os.path.abspath(path)
