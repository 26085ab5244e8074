"""Data records as lmctl reads them: loaded with `datasets`, their shape settled and checked
row by row, and fingerprinted.

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


def check_text_field(path: Path, records: Any, text_field: str) -> None:
    if text_field not in records.column_names:
        raise DataError(f"{path}: no field {text_field!r}", hint=f"columns are {sorted(records.column_names)}; set --text-field")


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
