"""The documents of a text-shaped file, as eval and drift read them: a small, regular .jsonl
with the json module (importing `datasets` costs seconds), anything else through `datasets`
with the checks of `lmctl.data.records`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmctl.data.records import BATCH, RowNamer, check_batch, check_rows, check_text_field, field_for, load_named
from lmctl.data.sources import resolve
from lmctl.errors import DataError

SMALL_JSONL_BYTES = 4 << 20  # below this a .jsonl is read with the json module: importing datasets costs seconds


def small_jsonl(path: Path) -> list[dict[str, Any]] | None:
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


def _texts_of(column: list[Any]) -> list[str]:
    return [t for t in column if isinstance(t, str) and t.strip()]


def small_texts(path: Path, text_field: str = "text") -> list[str] | None:
    """The non-empty documents of a small, regular .jsonl, read with the json module (eval then
    never imports datasets); None for any other input, which goes through datasets."""
    small = small_jsonl(path) if path.is_file() else None
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
