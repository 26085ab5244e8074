"""Turn checked records into training examples: token ids plus labels (-100 = not learned).

- text: each document ends with EOS and is cut into blocks of at most max_length; blocks
  never span two documents, so no sequence attends across a document boundary.
- completion: prompt tokens are masked, completion tokens + EOS are learned.
- chat: the tokenizer's chat template renders the conversation; only the characters of
  assistant turns (found by rendering the conversation prefix by prefix) are learned,
  including the template's end-of-turn marker, so the model learns to stop.
EOS is always a real label here: padding is masked by position in `collate`, never by
token id, so pad == eos cannot hide it.

`Tokenize` is the function `Dataset.map(batched=True, num_proc=...)` runs: it checks each
record's shape, hashes its content (duplicates and overlap), finds its PII kinds and
tokenizes it, one row per record, token ids in Arrow int32 columns. `ExampleSet` is a lazy
view over that table: examples are (record, offset, length) triples in numpy arrays, and
an example's tokens are read from the memory-mapped Arrow file only when it is used.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmctl import pii
from lmctl.data.records import RowNamer, check_batch
from lmctl.errors import DataError

IGNORE = -100


def record_text(rec: dict[str, Any], fmt: str, text_field: str) -> str:
    """The text a record contributes, in reading order, for stats and PII scanning."""
    if fmt == "chat":
        return "\n".join(str(m.get("content") or "") for m in rec.get("messages") or [])
    if fmt == "completion":
        return f"{rec.get('prompt') or ''}{rec.get('completion') or ''}"
    value = rec.get(text_field)
    return value if isinstance(value, str) else ""


def record_key(rec: dict[str, Any], fmt: str, text_field: str) -> str:
    """Identity of a record for de-duplication and overlap: a hash of its learned fields, as
    they are in the source (before any redaction). The one definition of a duplicate row:
    `data validate` counts with it and `data prepare` drops with it, so the two agree."""
    fields = {"chat": ["messages"], "completion": ["prompt", "completion"]}.get(fmt, [text_field])
    canonical = json.dumps([rec.get(f) for f in fields], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def features(tokens: bool) -> Any:
    """Arrow schema of a tokenized table (`tokens=False`: the scan columns only)."""
    from datasets import Features, List, Value

    cols = {"key": Value("binary"), "empty": Value("bool"), "pii": List(Value("string"))}
    if tokens:
        cols |= {"input_ids": List(Value("int32")), "labels": List(Value("int32")), "n_tokens": Value("int32"),
                 "n_kept": Value("int32"), "eos_labels": Value("int32")}
    return Features(cols)


def assistant_spans(messages: list[dict[str, str]], tokenizer: Any) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns."""
    render = tokenizer.apply_chat_template
    full = render(messages, tokenize=False)
    spans = []
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        before = render(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = render(messages[: i + 1], tokenize=False)
        if not (full.startswith(upto) and upto.startswith(before)):
            raise DataError("the chat template does not render conversations prefix by prefix; "
                            "cannot tell assistant turns apart")
        spans.append((len(before), len(upto)))
    return full, spans


def check_tokenizer(path: Path, fmt: str, tokenizer: Any) -> None:
    if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{path}: chat data needs a chat template, and this tokenizer has none",
                        hint="use a chat model's tokenizer or convert the data to prompt/completion")


@dataclass
class Tokenize:
    """Batched map function: shape check, content key, PII kinds and (with a tokenizer) tokens."""

    fmt: str
    text_field: str
    name: RowNamer
    tokenizer: Any = None
    max_length: int = 0

    def __call__(self, batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        check_batch(batch, indices, self.fmt, self.text_field, self.name)
        records = [dict(zip(batch, values)) for values in zip(*batch.values())]
        texts = [record_text(r, self.fmt, self.text_field) for r in records]
        out: dict[str, list[Any]] = {
            "key": [bytes.fromhex(record_key(r, self.fmt, self.text_field))[:16] for r in records],
            "empty": [not t.strip() for t in texts],
            "pii": [[f.kind for f in pii.find_pii(t)] for t in texts],
        }
        if self.tokenizer is not None:
            pairs = {"text": self._text, "completion": self._completion, "chat": self._chat}[self.fmt](records)
            out |= self._shape(pairs)
        return out

    def _eos(self) -> list[int]:
        return [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []

    def _text(self, records: list[dict[str, Any]]) -> list[tuple[list[int], list[int] | None]]:
        texts = [r.get(self.text_field) for r in records]
        keep = [i for i, t in enumerate(texts) if isinstance(t, str) and t.strip()]
        encoded = self.tokenizer([texts[i] for i in keep], add_special_tokens=True)["input_ids"] if keep else []
        pairs: list[tuple[list[int], list[int] | None]] = [([], None)] * len(records)
        eos = self._eos()  # once per batch: the tokenizer's eos_token_id is a lookup, not a field
        for i, ids in zip(keep, encoded):
            pairs[i] = (ids + eos, None)  # labels are the ids themselves
        return pairs

    def _completion(self, records: list[dict[str, Any]]) -> list[tuple[list[int], list[int] | None]]:
        prompts = self.tokenizer([r.get("prompt") or "" for r in records], add_special_tokens=True)["input_ids"]
        completions = self.tokenizer([r["completion"] for r in records], add_special_tokens=False)["input_ids"]
        eos = self._eos()
        return [(p + c + eos, [IGNORE] * len(p) + c + eos) for p, c in zip(prompts, completions)]

    def _chat(self, records: list[dict[str, Any]]) -> list[tuple[list[int], list[int] | None]]:
        rendered = [assistant_spans(r["messages"], self.tokenizer) for r in records]
        enc = self.tokenizer([text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
        pairs: list[tuple[list[int], list[int] | None]] = []
        for (_, spans), ids, offsets in zip(rendered, enc["input_ids"], enc["offset_mapping"]):
            labels = [tok if any(s <= start < e for s, e in spans) else IGNORE for tok, (start, _e) in zip(ids, offsets)]
            pairs.append((list(ids), labels))
        return pairs

    def _shape(self, pairs: list[tuple[list[int], list[int] | None]]) -> dict[str, list[Any]]:
        """Text keeps whole documents (cut into blocks later); other shapes are truncated here.
        Counts use list.count (C speed): this runs once per row of files with millions of rows."""
        eos, cap = self.tokenizer.eos_token_id, self.max_length
        cols: dict[str, list[Any]] = {"input_ids": [], "labels": [], "n_tokens": [], "n_kept": [], "eos_labels": []}
        for ids, labels in pairs:
            n = len(ids)
            if labels is None:  # text: every block of 2+ tokens is learned; a 1-token tail is dropped
                kept, labels = n, []
                eos_labels = ids.count(eos) - (n % cap == 1 and ids[-1] == eos) if n else 0
            else:
                ids, labels = ids[:cap], labels[:cap]
                kept = len(ids) if len(ids) >= 2 and labels[1:].count(IGNORE) < len(labels) - 1 else 0
                eos_labels = labels.count(eos) if kept else 0
            cols["input_ids"].append(ids)
            cols["labels"].append(labels)
            cols["n_tokens"].append(n)
            cols["n_kept"].append(kept)
            cols["eos_labels"].append(eos_labels if eos is not None else 0)
        return cols


class ExampleView(Sequence):  # type: ignore[type-arg]
    """Examples read lazily from the tokenized Arrow table."""

    def __init__(self, table: Any, rec: np.ndarray, start: np.ndarray, length: np.ndarray) -> None:
        self.table = table.select_columns(["input_ids", "labels"]) if table is not None else None
        self.rec, self.start, self.length = rec, start, length

    def __len__(self) -> int:
        return len(self.rec)

    def __getitem__(self, i: int) -> dict[str, list[int]]:  # type: ignore[override]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        row = self.table[int(self.rec[i])]
        s, n = int(self.start[i]), int(self.length[i])
        ids = row["input_ids"][s : s + n]
        return {"input_ids": ids, "labels": row["labels"][s : s + n] if row["labels"] else list(ids)}


@dataclass
class ExampleSet:
    """The examples of one data set plus what shaping them cost."""

    examples: Sequence[dict[str, list[int]]] = ()
    tokens_total: int = 0  # tokens before truncation
    tokens_dropped: int = 0  # tokens lost to truncation
    rows_dropped: int = 0  # rows with nothing left to learn after truncation
    eos_labels: int = 0  # EOS tokens that are learned (not masked)
    fmt: str | None = None  # text, completion or chat (None: unknown, e.g. a stream's sample)
    max_length: int | None = None  # the data.max_length the examples were cut at

    @property
    def truncation_rate(self) -> float:
        return self.tokens_dropped / self.tokens_total if self.tokens_total else 0.0

    @property
    def lengths(self) -> np.ndarray:
        if isinstance(self.examples, ExampleView):
            return self.examples.length
        return np.array([len(e["input_ids"]) for e in self.examples], dtype=np.int64)

    @property
    def memory_bytes(self) -> int:
        """Bytes this set keeps in process memory (the token ids stay in the memory-mapped file)."""
        view = self.examples
        return sum(a.nbytes for a in (view.rec, view.start, view.length)) if isinstance(view, ExampleView) else 0


def column(table: Any, name: str) -> np.ndarray:
    return table.data.column(name).to_numpy().astype(np.int64)


def example_set(table: Any, fmt: str, max_length: int) -> ExampleSet:
    """Examples of a tokenized table: text documents cut into blocks, other shapes one per kept row."""
    kept, total = column(table, "n_kept"), column(table, "n_tokens")
    if fmt == "text":
        blocks = -(-kept // max_length)  # ceil: blocks per document
        rec = np.repeat(np.arange(len(kept)), blocks)
        first = np.repeat(np.cumsum(blocks) - blocks, blocks)
        start = (np.arange(len(rec)) - first) * max_length
        length = np.minimum(max_length, kept[rec] - start)
        keep = length >= 2
        rec, start, length, dropped, rows_dropped = rec[keep], start[keep], length[keep], 0, 0
    else:
        rec = np.flatnonzero(kept > 0)
        start, length = np.zeros(len(rec), dtype=np.int64), kept[rec]
        dropped, rows_dropped = int(np.maximum(total - max_length, 0).sum()), int((kept == 0).sum())
    return ExampleSet(examples=ExampleView(table, rec, start.astype(np.int32), length.astype(np.int32)),
                      tokens_total=int(total.sum()), tokens_dropped=dropped, rows_dropped=rows_dropped,
                      eos_labels=int(column(table, "eos_labels").sum()), fmt=fmt, max_length=max_length)


def build_examples(path: Path, records: Any, fmt: str, text_field: str, tokenizer: Any, max_length: int) -> ExampleSet:
    """Tokenized examples of a loaded dataset, computed in memory (no cache; see lmctl.data.cache)."""
    from lmctl.data.sources import resolve

    check_tokenizer(path, fmt, tokenizer)
    table = records.map(Tokenize(fmt, text_field, RowNamer(resolve(path)), tokenizer, max_length), batched=True,
                        with_indices=True, remove_columns=records.column_names, features=features(True),
                        keep_in_memory=True)
    return example_set(table, fmt, max_length)


def collate(rows: list[dict[str, list[int]]], pad_id: int) -> dict[str, Any]:
    """Right-pad a batch; labels are -100 exactly on padding (never on a real EOS, even if pad == eos)."""
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        ids[i, :n] = torch.tensor(row["input_ids"])
        labels[i, :n] = torch.tensor(row.get("labels", row["input_ids"]))
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
