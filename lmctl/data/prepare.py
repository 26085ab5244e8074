"""`lmctl data prepare`: redact PII, drop exact duplicates and empty rows, split deterministically.

What is removed, and why (`removed` in the result, by reason):
- "duplicate": a row whose content equals an earlier row's *before* redaction, by the same
  key `data validate` counts duplicates with (lmctl.data.examples.record_key), so the two
  commands agree: `removed.duplicate` == validate's `duplicate_rows`. Redaction is a privacy
  step, not a statement that two rows are the same example: four support tickets that differ
  only in the caller's phone number are four rows of training signal, and collapsing them
  would silently change the data's distribution. Rows that are distinct before redaction but
  identical after it are kept and counted in `identical_after_redaction`, so it is not silent.
- "empty": a row with no text (whitespace only), which training skips anyway; one that
  repeats an earlier empty row is a duplicate first.

The split is by a hash of each record's content (plus a seed), not by position: adding
rows later never moves an existing row between train and validation, so a nightly
retrain keeps evaluating on the same held-out rows. Output is staged and renamed into
place; an existing output directory is only replaced with `--force`. Rows stream from the
memory-mapped Arrow table in batches and are written as they go: memory holds one batch
plus two 16-byte hashes per distinct row (raw and as written), never the rows themselves.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from lmctl import pii
from lmctl.atomic import require_empty_output, staging_dir, write_json_atomic
from lmctl.data.examples import record_key, record_text
from lmctl.data.records import batches, fingerprint, load_checked
from lmctl.errors import BadInputError


class PrepareResult(BaseModel):
    out: str
    format: str
    rows_in: int
    duplicates_removed: int  # == removed["duplicate"], kept for scripts that read it
    removed: dict[str, int]  # reason ("duplicate", "empty") -> rows dropped
    identical_after_redaction: int  # rows kept though their redacted content equals an earlier kept row's
    train_rows: int
    validation_rows: int
    pii_redacted: dict[str, int]
    train_fingerprint: str
    validation_fingerprint: str | None


def _redact_record(rec: dict[str, Any], fmt: str, field: str, counts: Counter[str], detector: pii.Detector) -> dict[str, Any]:
    def clean(text: Any) -> Any:
        if not isinstance(text, str):
            return text
        redacted, findings = detector.redact(text)
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
    seen: set[bytes] = field(default_factory=set)  # raw content keys: what a duplicate is
    written: set[bytes] = field(default_factory=set)  # content keys of the rows as written (redacted)
    counts: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.files = {name: (self.stage / f"{name}.jsonl").open("w", encoding="utf-8") for name in ("train", "validation")}

    def reason_to_drop(self, raw: dict[str, Any], fmt: str, text_field: str) -> tuple[str | None, str]:
        """("duplicate" | "empty" | None, the row's raw content key); counts the row in."""
        raw_key = record_key(raw, fmt, text_field)
        digest = bytes.fromhex(raw_key)[:16]
        reason = "duplicate" if digest in self.seen else "empty" if not record_text(raw, fmt, text_field).strip() else None
        self.seen.add(digest)
        self.counts["in"] += 1
        if reason:
            self.counts[f"removed:{reason}"] += 1
        return reason, raw_key

    def write(self, rec: dict[str, Any], raw_key: str, out_key: str) -> None:
        """Write a kept row (as redacted) to the split its raw content hashes to."""
        out_digest = bytes.fromhex(out_key)[:16]
        self.counts["identical_after_redaction"] += out_digest in self.written
        self.written.add(out_digest)
        name = "validation" if _in_validation(raw_key, self.seed, self.share) else "train"
        self.files[name].write(json.dumps(rec, ensure_ascii=False) + "\n")
        self.counts[name] += 1

    def removed(self) -> dict[str, int]:
        return {reason: self.counts[f"removed:{reason}"] for reason in ("duplicate", "empty")}

    def close(self) -> None:
        for fh in self.files.values():
            fh.close()
        if not self.counts["validation"]:
            (self.stage / "validation.jsonl").unlink()


def prepare(source: Path, out: Path, text_field: str = "text", fmt: str = "auto", validation_share: float = 0.1,
            seed: int = 0, redact: bool = True, force: bool = False,
            detector: pii.Detector | None = None) -> PrepareResult:
    if not 0.0 <= validation_share < 1.0:
        raise BadInputError(f"--validation-share {validation_share} must be in [0, 1)")
    require_empty_output(out, force)
    records, fmt, field_ = load_checked(source, text_field, fmt)  # type: ignore[arg-type]
    counts: Counter[str] = Counter()
    with staging_dir(out) as stage:
        split = _Split(stage, seed, validation_share)
        try:
            for batch, _ in batches(records):
                for values in zip(*batch.values()):
                    raw = dict(zip(batch, values))
                    reason, raw_key = split.reason_to_drop(raw, fmt, field_)
                    if reason is None:
                        rec = _redact_record(raw, fmt, field_, counts, detector or pii.DEFAULT) if redact else raw
                        split.write(rec, raw_key, record_key(rec, fmt, field_))
        finally:
            split.close()
        if not split.counts["train"]:
            raise BadInputError(f"{source}: no training rows left after removing duplicate and empty rows and the split")
        n_train, n_val = split.counts["train"], split.counts["validation"]
        result = PrepareResult(
            out=str(out), format=fmt, rows_in=split.counts["in"], duplicates_removed=split.removed()["duplicate"],
            removed=split.removed(), identical_after_redaction=split.counts["identical_after_redaction"],
            train_rows=n_train, validation_rows=n_val, pii_redacted=dict(sorted(counts.items())),
            train_fingerprint=fingerprint(stage / "train.jsonl", field_, n_train, fmt).sha256,
            validation_fingerprint=fingerprint(stage / "validation.jsonl", field_, n_val, fmt).sha256
            if n_val else None,
        )
        write_json_atomic(stage / "prepare.json", {"source": str(source), **result.model_dump()})
    return result
