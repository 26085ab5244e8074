"""`lmctl data validate`: what is in a data file before a model ever sees it.

Rows, empty and duplicate rows, token-length percentiles and the truncation rate at
`max_length` (when a tokenizer is given), train/validation overlap, and PII findings by
kind (lmctl.pii). The report describes; it does not fail on findings (exit 0), so a CI
step reads `ok` and `issues` from `--json`.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from lmctl import data, pii, stats


class TokenStats(BaseModel):
    p50: float
    p95: float
    max: int
    mean: float
    truncation_rate: float
    max_length: int


class FileReport(BaseModel):
    path: str
    format: str
    rows: int
    empty_rows: int
    duplicate_rows: int
    tokens: TokenStats | None
    pii: dict[str, int]
    fingerprint: str


class DataReport(BaseModel):
    ok: bool
    issues: list[str]
    train: FileReport
    validation: FileReport | None
    overlap_rows: int | None


def record_text(rec: dict[str, Any], fmt: str, text_field: str) -> str:
    """The text a record contributes, in reading order, for stats and PII scanning."""
    if fmt == "chat":
        return "\n".join(str(m.get("content") or "") for m in rec.get("messages") or [])
    if fmt == "completion":
        return f"{rec.get('prompt') or ''}{rec.get('completion') or ''}"
    value = rec.get(text_field)
    return value if isinstance(value, str) else ""


def record_key(rec: dict[str, Any], fmt: str, text_field: str) -> str:
    """Identity of a record for de-duplication and overlap: a hash of its learned fields."""
    fields = {"chat": ["messages"], "completion": ["prompt", "completion"]}.get(fmt, [text_field])
    canonical = json.dumps([rec.get(f) for f in fields], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _token_stats(texts: list[str], tokenizer: Any, max_length: int) -> TokenStats | None:
    lengths = sorted(len(ids) for ids in tokenizer([t for t in texts if t], add_special_tokens=True)["input_ids"])
    if not lengths:
        return None
    over = sum(max(0, n - max_length) for n in lengths)
    p50, p95 = stats.percentiles(lengths, (0.5, 0.95))
    return TokenStats(p50=p50, p95=p95, max=lengths[-1],
                      mean=round(sum(lengths) / len(lengths), 2), truncation_rate=round(over / sum(lengths), 6),
                      max_length=max_length)


def describe(path: Path, text_field: str, fmt: str, tokenizer: Any | None, max_length: int) -> tuple[FileReport, set[str]]:
    records, fmt, field = data.load_checked(path, text_field, fmt)  # type: ignore[arg-type]
    texts = [record_text(r, fmt, field) for r in records]
    keys = [record_key(r, fmt, field) for r in records]
    findings = Counter(f.kind for t in texts for f in pii.find_pii(t))
    report = FileReport(
        path=str(path), format=fmt, rows=len(records), empty_rows=sum(1 for t in texts if not t.strip()),
        duplicate_rows=len(keys) - len(set(keys)),
        tokens=_token_stats(texts, tokenizer, max_length) if tokenizer is not None else None,
        pii=dict(sorted(findings.items())), fingerprint=data.fingerprint(path, field, len(records), fmt).sha256,
    )
    return report, set(keys)


def _issues(train: FileReport, validation: FileReport | None, overlap: int | None) -> list[str]:
    issues = []
    for rep in (train, validation):
        if rep is None:
            continue
        if rep.empty_rows:
            issues.append(f"{rep.path}: {rep.empty_rows} empty rows")
        if rep.duplicate_rows:
            issues.append(f"{rep.path}: {rep.duplicate_rows} duplicate rows")
        if rep.pii:
            issues.append(f"{rep.path}: PII found ({', '.join(f'{k} {v}' for k, v in rep.pii.items())})")
        if rep.tokens and rep.tokens.truncation_rate > 0.05:
            issues.append(f"{rep.path}: truncation at {rep.tokens.max_length} drops {rep.tokens.truncation_rate:.1%} of tokens")
    if overlap:
        issues.append(f"{overlap} validation rows also appear in the training data")
    return issues


def validate(train: Path, validation: Path | None = None, text_field: str = "text", fmt: str = "auto",
             tokenizer: Any | None = None, max_length: int = 512) -> DataReport:
    train_report, train_keys = describe(train, text_field, fmt, tokenizer, max_length)
    val_report, overlap = None, None
    if validation is not None:
        val_report, val_keys = describe(validation, text_field, fmt, tokenizer, max_length)
        overlap = len(train_keys & val_keys)
    issues = _issues(train_report, val_report, overlap)
    return DataReport(ok=not issues, issues=issues, train=train_report, validation=val_report, overlap_rows=overlap)
