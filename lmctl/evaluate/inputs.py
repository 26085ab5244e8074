"""The eval data ready for scoring: one data file's documents for one model's tokenizer.

A small, regular .jsonl is tokenized in process as the documents are pulled; anything else
goes through the tokenization cache (purpose "eval"); `lmctl.data.documents` says why.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmctl.checkpoint import DataFingerprint
from lmctl.data import fingerprint, small_texts
from lmctl.data.cache import tokenized
from lmctl.data.documents import CHUNK, Document, tokenize_documents


@dataclass
class Documents:
    """One data file's documents for one tokenizer; iterable any number of times, in file order."""

    fingerprint: DataFingerprint
    byte_counts: list[int]
    texts: list[str] | None = None  # the small route: texts in memory, tokenized as iterated
    tokenizer: Any = None
    table: Any = None  # the cached route: a memory-mapped Arrow table
    hit: bool | None = None  # cache hit; None when the small route skipped the cache

    def __len__(self) -> int:
        return len(self.byte_counts)

    def __iter__(self) -> Iterator[Document]:
        if self.texts is not None:
            yield from tokenize_documents(self.texts, self.tokenizer)
            return
        for batch in self.table.data.to_batches(max_chunksize=CHUNK):
            cols = batch.to_pydict()
            yield from (Document(*row) for row in zip(cols["input_ids"], cols["words"], cols["bytes"]))


def documents(path: Path, text_field: str, tokenizer: Any, texts: list[str] | None = None) -> Documents:
    """The documents of `path` for `tokenizer`. `texts` are those `small_texts` already read;
    without them the file goes through the tokenization cache."""
    if texts is None:
        texts = small_texts(path, text_field)
    if texts is not None:
        return Documents(fingerprint=fingerprint(path, text_field, len(texts)),
                         byte_counts=[len(t.encode("utf-8")) for t in texts], texts=texts, tokenizer=tokenizer)
    tokens = tokenized(path, text_field, "text", tokenizer, 0, purpose="eval")
    return Documents(fingerprint=tokens.fingerprint, byte_counts=tokens.table.data.column("bytes").to_pylist(),
                     table=tokens.table, hit=tokens.hit)
