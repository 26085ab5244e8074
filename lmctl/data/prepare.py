"""`lmctl data prepare`: redact PII, drop exact duplicates, split deterministically.

The split is by a hash of each record's content (plus a seed), not by position: adding
rows later never moves an existing row between train and validation, so a nightly
retrain keeps evaluating on the same held-out rows. Output is staged and renamed into
place; an existing output directory is only replaced with `--force`. Rows stream from the
memory-mapped Arrow table in batches and are written as they go: memory holds one batch
plus a 16-byte hash per distinct row, never the rows themselves.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from lmctl import data, pii
from lmctl.atomic import require_empty_output, staging_dir, write_json_atomic
from lmctl.data.examples import record_key
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


@dataclass
class _Split:
    """Writes kept rows to train/validation as they arrive; only 16-byte content hashes stay in memory."""

    stage: Path
    seed: int
    share: float
    seen: set[bytes] = field(default_factory=set)
    counts: dict[str, int] = field(default_factory=lambda: {"train": 0, "validation": 0, "in": 0})

    def __post_init__(self) -> None:
        self.files = {name: (self.stage / f"{name}.jsonl").open("w", encoding="utf-8") for name in ("train", "validation")}

    def add(self, rec: dict[str, Any], key: str) -> None:
        self.counts["in"] += 1
        digest = bytes.fromhex(key)[:16]
        if digest in self.seen:
            return
        self.seen.add(digest)
        name = "validation" if _in_validation(key, self.seed, self.share) else "train"
        self.files[name].write(json.dumps(rec, ensure_ascii=False) + "\n")
        self.counts[name] += 1

    def close(self) -> None:
        for fh in self.files.values():
            fh.close()
        if not self.counts["validation"]:
            (self.stage / "validation.jsonl").unlink()


def prepare(source: Path, out: Path, text_field: str = "text", fmt: str = "auto", validation_share: float = 0.1,
            seed: int = 0, redact: bool = True, force: bool = False) -> PrepareResult:
    if not 0.0 <= validation_share < 1.0:
        raise BadInputError(f"--validation-share {validation_share} must be in [0, 1)")
    require_empty_output(out, force)
    records, fmt, field_ = data.load_checked(source, text_field, fmt)  # type: ignore[arg-type]
    counts: Counter[str] = Counter()
    with staging_dir(out) as stage:
        split = _Split(stage, seed, validation_share)
        try:
            for batch, _ in data.batches(records):
                for values in zip(*batch.values()):
                    rec = dict(zip(batch, values))
                    rec = _redact_record(rec, fmt, field_, counts) if redact else rec
                    split.add(rec, record_key(rec, fmt, field_))
        finally:
            split.close()
        if not split.counts["train"]:
            raise BadInputError(f"{source}: no training rows left after de-duplication and the split")
        n_train, n_val = split.counts["train"], split.counts["validation"]
        result = PrepareResult(
            out=str(out), format=fmt, rows_in=split.counts["in"], duplicates_removed=split.counts["in"] - len(split.seen),
            train_rows=n_train, validation_rows=n_val, pii_redacted=dict(sorted(counts.items())),
            train_fingerprint=data.fingerprint(stage / "train.jsonl", field_, n_train, fmt).sha256,
            validation_fingerprint=data.fingerprint(stage / "validation.jsonl", field_, n_val, fmt).sha256
            if n_val else None,
        )
        write_json_atomic(stage / "prepare.json", {"source": str(source), **result.model_dump()})
    return result
