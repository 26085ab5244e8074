"""Load data with `datasets`, check its shape row by row, and fingerprint it.

Supported files: .txt (one document per blank-line-separated paragraph), .jsonl/.json,
.csv and .parquet. Three record shapes (`data.format`, default auto-detected):
- text: a text column (`data.text_field`),
- completion: `prompt` and `completion` columns (loss on the completion only),
- chat: a `messages` column of {role, content} turns (loss on assistant turns only).
Problems are DataError (exit 2) naming the file, the row and the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from lmctl.errors import DataError
from lmctl.home import cache_dir

_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
Format = Literal["auto", "text", "completion", "chat"]
ROLES = ("system", "user", "assistant", "tool")


class DataFingerprint(BaseModel):
    """Identifies the exact data a model saw: file bytes plus how they were read."""

    path: str
    sha256: str
    rows: int
    text_field: str
    format: str = "text"


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


def load_records(path: Path) -> list[dict[str, Any]]:
    """Every row of `path` as a dict (a .txt paragraph becomes {"text": ...})."""
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    builder = _BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"{path}: unsupported data format {path.suffix!r}", hint=f"use one of {', '.join(_BUILDERS)}")
    small = _small_jsonl(path)
    if small is not None:
        return small
    from datasets import load_dataset

    kwargs: dict[str, Any] = {"sample_by": "paragraph"} if builder == "text" else {}
    try:
        ds = load_dataset(builder, data_files=str(path), split="train", cache_dir=str(cache_dir() / "datasets"), **kwargs)
    except Exception as exc:  # datasets raises many types for malformed files
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"{path}: cannot be read as {builder}: {why}") from None
    if ds.num_rows == 0:
        raise DataError(f"{path}: no rows")
    return ds.to_list()


def detect_format(path: Path, records: list[dict[str, Any]], text_field: str, declared: Format = "auto") -> str:
    """The record shape: the declared one, else chat / completion / text by the columns present."""
    columns = set(records[0])
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


def _check_chat(path: Path, row: int, messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{path}: row {row}: field 'messages' must be a non-empty list of turns")
    for i, turn in enumerate(messages):
        if not isinstance(turn, dict) or turn.get("role") not in ROLES:
            raise DataError(f"{path}: row {row}: field 'messages'[{i}].role must be one of {', '.join(ROLES)}")
        if not isinstance(turn.get("content"), str):
            raise DataError(f"{path}: row {row}: field 'messages'[{i}].content must be a string")
    if not any(t["role"] == "assistant" for t in messages):
        raise DataError(f"{path}: row {row}: field 'messages' has no assistant turn to learn from")


def check_rows(path: Path, records: list[dict[str, Any]], fmt: str, text_field: str) -> None:
    """Raise DataError naming the first row (1-based) whose fields have the wrong shape."""
    for row, rec in enumerate(records, start=1):
        if fmt == "chat":
            _check_chat(path, row, rec.get("messages"))
            continue
        fields = ("prompt", "completion") if fmt == "completion" else (text_field,)
        for field in fields:
            value = rec.get(field)
            if field not in rec:
                raise DataError(f"{path}: row {row}: no field {field!r}")
            if value is not None and not isinstance(value, str):
                raise DataError(f"{path}: row {row}: field {field!r} must be a string, got {type(value).__name__}")
        if fmt == "completion" and not (rec.get("completion") or "").strip():
            raise DataError(f"{path}: row {row}: field 'completion' is empty")


def field_for(path: Path, text_field: str) -> str:
    """The text column of `path`: a .txt file's paragraphs are always in "text"."""
    return "text" if path.suffix.lower() == ".txt" else text_field


def load_checked(path: Path, text_field: str, declared: Format = "auto") -> tuple[list[dict[str, Any]], str, str]:
    """Read `path`, settle its record shape and check every row: (records, format, text field)."""
    records = load_records(path)
    field = field_for(path, text_field)
    fmt = detect_format(path, records, field, declared)
    check_rows(path, records, fmt, field)
    return records, fmt, field


def load_texts(path: Path, text_field: str = "text") -> list[str]:
    """The non-empty documents of a text-shaped file (for perplexity and drift)."""
    records = load_records(path)
    field = field_for(path, text_field)
    if field not in records[0]:
        raise DataError(f"{path}: no field {field!r}", hint=f"columns are {sorted(records[0])}; set --text-field")
    check_rows(path, records, "text", field)
    texts = [r[field] for r in records if isinstance(r[field], str) and r[field].strip()]
    if not texts:
        raise DataError(f"{path}: no non-empty text in field {field!r}")
    return texts


def fingerprint(path: Path, text_field: str, rows: int, fmt: str = "text") -> DataFingerprint:
    from lmctl.checkpoint import file_digest  # checkpoint imports this module: import at call time

    digest = file_digest(path)
    digest.update(f"\0{text_field}\0{fmt}".encode())
    return DataFingerprint(path=str(path), sha256=digest.hexdigest(), rows=rows, text_field=text_field, format=fmt)
