"""`lmctl data validate`: what is in a data file before a model ever sees it.

Rows, empty and duplicate rows, token-length percentiles and the truncation rate at
`max_length` (when a tokenizer is given), train/validation overlap, and PII findings by
kind (lmctl.pii). Every statistic is an aggregate over the columns of the cached tokenized
table (lmctl.data.cache), so memory does not grow with the file: duplicates and overlap use
16-byte content hashes (`record_key`, over the raw rows: the rows `data prepare` drops as
duplicates), token lengths one int per row. PII counts use the default detector (lmctl.pii). Token lengths are counted as
training tokenizes the rows (EOS, chat template). The report describes; it does not fail on findings (exit 0), so a CI
step reads `ok` and `issues` from `--json`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from lmctl import stats
from lmctl.data.cache import tokenized
from lmctl.data.examples import column


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


def _token_stats(table: Any, empty: np.ndarray, max_length: int) -> TokenStats | None:
    lengths = np.sort(column(table, "n_tokens")[~empty])
    lengths = lengths[lengths > 0]
    if not len(lengths):
        return None
    total = int(lengths.sum())
    p50, p95 = stats.percentiles(lengths, (0.5, 0.95))
    over = int(np.maximum(lengths - max_length, 0).sum())
    return TokenStats(p50=p50, p95=p95, max=int(lengths[-1]),
                      mean=round(total / len(lengths), 2), truncation_rate=round(over / total, 6),
                      max_length=max_length)


def describe(path: Path, text_field: str, fmt: str, tokenizer: Any | None, max_length: int,
             num_proc: int | None = None) -> tuple[FileReport, Any]:
    """One file's report and its distinct content keys, from the (cached) tokenized table."""
    import pyarrow.compute as pc

    tokens = tokenized(path, text_field, fmt, tokenizer, max_length, num_proc)  # type: ignore[arg-type]
    table = tokens.table
    empty = table.data.column("empty").to_numpy(zero_copy_only=False)
    keys = pc.unique(table.data.column("key"))
    kinds = pc.value_counts(pc.list_flatten(table.data.column("pii"))).to_pylist()
    report = FileReport(
        path=str(path), format=tokens.entry.format, rows=table.num_rows, empty_rows=int(empty.sum()),
        duplicate_rows=table.num_rows - len(keys),
        tokens=_token_stats(table, empty, max_length) if tokenizer is not None else None,
        pii={k["values"]: k["counts"] for k in sorted(kinds, key=lambda k: k["values"])},
        fingerprint=tokens.fingerprint.sha256,
    )
    return report, keys


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
             tokenizer: Any | None = None, max_length: int = 512, num_proc: int | None = None) -> DataReport:
    import pyarrow.compute as pc

    train_report, train_keys = describe(train, text_field, fmt, tokenizer, max_length, num_proc)
    val_report, overlap = None, None
    if validation is not None:
        val_report, val_keys = describe(validation, text_field, fmt, tokenizer, max_length, num_proc)
        overlap = int(pc.sum(pc.is_in(val_keys, value_set=train_keys)).as_py() or 0)
    issues = _issues(train_report, val_report, overlap)
    return DataReport(ok=not issues, issues=issues, train=train_report, validation=val_report, overlap_rows=overlap)
