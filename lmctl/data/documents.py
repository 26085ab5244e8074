"""The documents `lmctl eval` scores: each non-empty text of a text-shaped file, tokenized
without special tokens (docs/perplexity.md), with its word and UTF-8 byte counts.

One tokenization (`document_columns`), two routes to it (`lmctl.evaluate.inputs`):
- a small, regular .jsonl (read with the json module, `lmctl.data.small_texts`) is
  tokenized in process, a chunk at a time, as perplexity pulls the documents. Hashing the
  file and opening a cache entry would cost more than tokenizing it, and importing
  `datasets` costs seconds of eval's start-up;
- anything else goes through the tokenization cache (`lmctl.data.cache`, purpose "eval"):
  `Dataset.map` tokenizes it once, and every later eval with the same data bytes, text
  field and tokenizer reads the token ids back from memory-mapped Arrow. Either way,
  memory holds a chunk of documents and the per-document counts, never every text.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

CHUNK = 64  # documents tokenized (or read back) at a time: the fast tokenizer batches, memory stays flat
# Bump when document_columns changes what it produces: every older eval entry then misses.
EVAL_SHAPING = {"eval": "non-empty documents, no special tokens; words = whitespace split; UTF-8 bytes", "version": 1}


@dataclass(frozen=True)
class Document:
    ids: list[int]
    words: int
    bytes: int


def document_columns(texts: list[str], tokenizer: Any) -> dict[str, list[Any]]:
    """Token ids (no special tokens), words and UTF-8 bytes of each non-empty text, in order."""
    kept = [t for t in texts if isinstance(t, str) and t.strip()]
    ids = tokenizer(kept, add_special_tokens=False)["input_ids"] if kept else []
    return {"input_ids": [list(i) for i in ids], "words": [len(re.split(r"\s+", t)) for t in kept],
            "bytes": [len(t.encode("utf-8")) for t in kept]}


def tokenize_documents(texts: Any, tokenizer: Any) -> Iterator[Document]:
    """Documents of any iterable of texts, tokenized a chunk at a time as they are pulled."""
    from itertools import islice

    it = iter(texts)
    while chunk := list(islice(it, CHUNK)):
        cols = document_columns(chunk, tokenizer)
        yield from (Document(*row) for row in zip(cols["input_ids"], cols["words"], cols["bytes"]))


@dataclass
class DocumentsTokenize:
    """The batched map function of an eval cache entry (picklable, for num_proc workers)."""

    text_field: str
    tokenizer: Any

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        return document_columns(batch[self.text_field], self.tokenizer)


def document_features() -> Any:
    from datasets import Features, List, Value

    return Features({"input_ids": List(Value("int32")), "words": Value("int64"), "bytes": Value("int64")})
