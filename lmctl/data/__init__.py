"""Data: load records with `datasets`, check their shape row by row, fingerprint them, and
turn them into training examples, eval documents and packed rows.

The package's face: the names other stages use, defined in `records` (loading, shape checks,
fingerprints) and `texts` (a text-shaped file's documents, for eval and drift); the
tokenization cache, examples, packing, `data validate` and `data prepare` are modules of their own.
"""

from __future__ import annotations

from lmctl.data.records import (BATCH, ROLES, Format, RowNamer, batches, check_batch, check_rows, check_text_field,
                                detect_format, field_for, fingerprint, load_checked, load_named, load_records,
                                location)
from lmctl.data.texts import load_texts, small_texts

__all__ = ["BATCH", "ROLES", "Format", "RowNamer", "batches", "check_batch", "check_rows",
           "check_text_field", "detect_format", "field_for", "fingerprint", "load_checked", "load_named",
           "load_records", "load_texts", "location", "small_texts"]
