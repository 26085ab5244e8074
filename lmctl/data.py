"""Load text data with `datasets`, validate its shape, fingerprint it and tokenize it.

Supported: .txt (one document per blank-line-separated paragraph), .jsonl/.json, .csv and
.parquet with a text column. Problems are DataError (exit 2) naming the file and field.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from lmctl.errors import DataError
from lmctl.home import cache_dir

_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


class DataFingerprint(BaseModel):
    """Identifies the exact data a model saw: file bytes plus how they were read."""

    path: str
    sha256: str
    rows: int
    text_field: str


def load_texts(path: Path, text_field: str = "text") -> list[str]:
    """The documents in `path` as a list of non-empty strings."""
    from datasets import load_dataset

    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    builder = _BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"{path}: unsupported data format {path.suffix!r}", hint=f"use one of {', '.join(_BUILDERS)}")
    kwargs: dict[str, Any] = {"sample_by": "paragraph"} if builder == "text" else {}
    try:
        ds = load_dataset(builder, data_files=str(path), split="train", cache_dir=str(cache_dir() / "datasets"), **kwargs)
    except Exception as exc:  # datasets raises many types for malformed files
        raise DataError(f"{path}: cannot be read as {builder}: {str(exc).splitlines()[0]}") from None
    field = "text" if builder == "text" else text_field
    if field not in ds.column_names:
        raise DataError(f"{path}: no field {field!r}", hint=f"columns are {ds.column_names}; set data.text_field")
    texts = [t for t in ds[field] if isinstance(t, str) and t.strip()]
    if not texts:
        raise DataError(f"{path}: no non-empty text in field {field!r}")
    return texts


def fingerprint(path: Path, text_field: str, rows: int) -> DataFingerprint:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    digest.update(f"\0{text_field}".encode())
    return DataFingerprint(path=str(path), sha256=digest.hexdigest(), rows=rows, text_field=text_field)


def tokenize_documents(texts: list[str], tokenizer: Any, max_length: int) -> list[list[int]]:
    """Tokenize each document, end it with EOS, and cut it into blocks of at most max_length.

    Blocks never span two documents, so no sequence attends across a document boundary,
    and the EOS token is a real label: the model learns where text ends.
    """
    blocks: list[list[int]] = []
    eos = tokenizer.eos_token_id
    encoded = tokenizer(texts, add_special_tokens=True)["input_ids"]
    for ids in encoded:
        ids = list(ids) + ([eos] if eos is not None else [])
        blocks.extend(ids[i : i + max_length] for i in range(0, len(ids), max_length) if len(ids[i : i + max_length]) > 1)
    return blocks


def collate(blocks: list[dict[str, list[int]]], pad_id: int) -> dict[str, Any]:
    """Right-pad a batch; labels are -100 exactly on padding (never on a real EOS, even if pad == eos)."""
    import torch

    width = max(len(b["input_ids"]) for b in blocks)
    ids = torch.full((len(blocks), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(blocks), width), dtype=torch.long)
    for row, block in enumerate(blocks):
        n = len(block["input_ids"])
        ids[row, :n] = torch.tensor(block["input_ids"])
        mask[row, :n] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
