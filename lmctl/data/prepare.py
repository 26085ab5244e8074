"""`lmctl data prepare`: redact PII, drop exact duplicates, split deterministically.

The split is by a hash of each record's content (plus a seed), not by position: adding
rows later never moves an existing row between train and validation, so a nightly
retrain keeps evaluating on the same held-out rows. Output is staged and renamed into
place; an existing output directory is only replaced with `--force`.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from lmctl import data, pii
from lmctl.atomic import require_empty_output, staging_dir, write_json_atomic
from lmctl.data.quality import record_key
from lmctl.errors import BadInputError


class PrepareResult(BaseModel):
    out: str
    format: str
    rows_in: int
    duplicates_removed: int
    train_rows: int
    validation_rows: int
    pii_redacted: dict[str, int]
    train_fingerprint: str
    validation_fingerprint: str | None


def _redact_record(rec: dict[str, Any], fmt: str, field: str, counts: Counter[str]) -> dict[str, Any]:
    def clean(text: Any) -> Any:
        if not isinstance(text, str):
            return text
        redacted, findings = pii.redact(text)
        counts.update(f.kind for f in findings)
        return redacted

    out = dict(rec)
    if fmt == "chat":
        out["messages"] = [{**m, "content": clean(m.get("content"))} for m in rec["messages"]]
    for key in ("prompt", "completion") if fmt == "completion" else (() if fmt == "chat" else (field,)):
        out[key] = clean(rec.get(key))
    return out


def _in_validation(key: str, seed: int, share: float) -> bool:
    bucket = int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:12], 16) / float(1 << 48)
    return bucket < share


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")


def prepare(source: Path, out: Path, text_field: str = "text", fmt: str = "auto", validation_share: float = 0.1,
            seed: int = 0, redact: bool = True, force: bool = False) -> PrepareResult:
    if not 0.0 <= validation_share < 1.0:
        raise BadInputError(f"--validation-share {validation_share} must be in [0, 1)")
    require_empty_output(out, force)
    records, fmt, field = data.load_checked(source, text_field, fmt)  # type: ignore[arg-type]
    counts: Counter[str] = Counter()
    cleaned = [_redact_record(r, fmt, field, counts) if redact else r for r in records]
    seen: set[str] = set()
    train, validation = [], []
    for rec in cleaned:
        key = record_key(rec, fmt, field)
        if key in seen:
            continue
        seen.add(key)
        (validation if _in_validation(key, seed, validation_share) else train).append(rec)
    if not train:
        raise BadInputError(f"{source}: no training rows left after de-duplication and the split")
    with staging_dir(out) as stage:
        _write_jsonl(stage / "train.jsonl", train)
        if validation:
            _write_jsonl(stage / "validation.jsonl", validation)
        result = PrepareResult(
            out=str(out), format=fmt, rows_in=len(records), duplicates_removed=len(records) - len(seen),
            train_rows=len(train), validation_rows=len(validation), pii_redacted=dict(sorted(counts.items())),
            train_fingerprint=data.fingerprint(stage / "train.jsonl", field, len(train), fmt).sha256,
            validation_fingerprint=data.fingerprint(stage / "validation.jsonl", field, len(validation), fmt).sha256
            if validation else None,
        )
        write_json_atomic(stage / "prepare.json", {"source": str(source), **result.model_dump()})
    return result
