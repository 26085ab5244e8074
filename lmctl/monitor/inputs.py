"""The inputs of `lmctl drift`: a data file or serve's request sample log, checked and subsampled.

A sample log (JSONL rows with `prompt` and `request_id`, schema lmctl.sample/1): a completion row
contributes its prompt, a chat row its messages' contents joined by newlines (not the templated
prompt, whose special tokens would skew the token checks).
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmctl import data
from lmctl.config import DriftConfig
from lmctl.errors import DataError

log = logging.getLogger("lmctl.drift")


@dataclass
class _Input:
    texts: list[str]
    meta: dict[str, Any]


def _first_row(path: Path) -> dict[str, Any] | None:
    if path.suffix.lower() not in (".jsonl", ".json"):
        return None
    with path.open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.strip():
                with contextlib.suppress(json.JSONDecodeError):
                    row = json.loads(line)
                    return row if isinstance(row, dict) else None
                return None
    return None


def is_sample_log(path: Path) -> bool:
    """True for serve's request sample log: JSON lines with `prompt` and `request_id`."""
    row = _first_row(path)
    return row is not None and "prompt" in row and "request_id" in row


def _sample_text(row: dict[str, Any]) -> str:
    messages = row.get("messages")
    if isinstance(messages, list) and messages:
        return "\n".join(str(m.get("content") or "") for m in messages if isinstance(m, dict))
    prompt = row.get("prompt")
    return prompt if isinstance(prompt, str) else ""


def read_sample_log(path: Path) -> list[str]:
    """The non-empty prompt texts of a sample log, in file order."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason})") from None
    texts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # serve appends whole lines; a crash can cut only the last one
                log.warning("%s: skipping a truncated last line", path)
                continue
            raise DataError(f"{path}: line {number}: not valid JSON") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {number}: expected a JSON object")
        text = _sample_text(row)
        if text.strip():
            texts.append(text)
    if not texts:
        raise DataError(f"{path}: no prompt text in the sample log")
    return texts


def sample(texts: list[str], limit: int | None, seed: int) -> list[str]:
    """A seeded random subset in file order (all of them when within the limit)."""
    if limit is None or len(texts) <= limit:
        return texts
    keep = sorted(random.Random(seed).sample(range(len(texts)), limit))
    return [texts[i] for i in keep]


def _is_blank(path: Path) -> bool:
    """True when the file holds only whitespace (read in blocks: sample logs can be large)."""
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 16), b""):
            if block.strip():
                return False
    return True


def load_input(path: Path, text_field: str, cfg: DriftConfig, role: str) -> _Input:
    """Read a reference or current file (a data file or a sample log), checked and subsampled."""
    if not path.is_file():
        raise DataError(f"{role} file not found: {path}")
    if _is_blank(path):
        raise DataError(f"{role} file {path} is empty")
    if is_sample_log(path):
        texts, fmt, field = read_sample_log(path), "serve_sample", "prompt"
    else:
        texts, fmt, field = data.load_texts(path, text_field), "text", data.field_for(path, text_field)
    if len(texts) < cfg.min_documents:
        raise DataError(f"{role} file {path} has {len(texts)} document(s); drift needs at least {cfg.min_documents}",
                        hint="collect more, or lower --min-documents")
    scored = sample(texts, cfg.max_documents, cfg.seed)
    meta = data.fingerprint(path, field, len(texts), fmt).model_dump()
    return _Input(texts=scored, meta={**meta, "documents": len(scored)})
