"""`data.streaming: true`: train from a `datasets.IterableDataset` when the data set does not
fit the disk cache.

Rows are read, shape-checked and tokenized as the Trainer pulls them (`IterableDataset.map`,
batched), cut into examples exactly as the cached path does, and packed best-fit within
each batch of PACK_WINDOW examples (a stream cannot be sorted as a whole). The stream has
no length, so training needs `train.max_steps`. Order is the file order (shards sorted), so
it is deterministic, and it repeats without end (`IterableDataset.repeat`), so the Trainer
sees one long epoch: on `--resume` it skips the batches it already trained on
(transformers' `skip_first_batches`), which are exactly the examples consumed before. The
skipped rows are read and tokenized again (a stream cannot seek), never trained on twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmctl.checkpoint import DataFingerprint
from lmctl.data.records import Format, RowNamer, detect_format, field_for, fingerprint
from lmctl.data.examples import Tokenize, check_tokenizer
from lmctl.data.packing import pack_batch
from lmctl.data.sources import resolve

PACK_WINDOW = 1000  # examples packed together; bigger fills rows better and holds more in memory


def _examples(batch: dict[str, list[Any]], fmt: str, max_length: int) -> dict[str, list[Any]]:
    """Tokenized records -> examples: text documents in blocks of max_length, other shapes as kept."""
    out: dict[str, list[Any]] = {"input_ids": [], "labels": []}
    for ids, labels, kept in zip(batch["input_ids"], batch["labels"], batch["n_kept"]):
        if not kept:
            continue
        if fmt != "text":
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            continue
        for start in range(0, kept, max_length):
            block = ids[start : start + max_length]
            if len(block) >= 2:
                out["input_ids"].append(block)
                out["labels"].append(block)
    return out


def stream(spec: Path, text_field: str, declared: Format, tokenizer: Any, max_length: int,
           packing: bool) -> tuple[Any, DataFingerprint]:
    """The training rows as an IterableDataset, and the fingerprint of the files behind it."""
    from datasets import load_dataset

    source = resolve(spec)
    digest = source.bytes_digest()
    kwargs: dict[str, Any] = {"sample_by": "paragraph"} if source.builder == "text" else {}
    files = [str(f) for f in source.files if not source.saved or f.suffix == ".arrow"]
    rows = load_dataset(source.builder, data_files=files, split="train", streaming=True, **kwargs)
    field = field_for(source, text_field)
    fmt = detect_format(spec, rows, field, declared)
    check_tokenizer(spec, fmt, tokenizer)
    namer = RowNamer(source, [0] if len(source.files) == 1 else [])
    columns = rows.column_names or list(next(iter(rows)))
    tokens = rows.map(Tokenize(fmt, field, namer, tokenizer, max_length), batched=True, with_indices=True,
                      remove_columns=columns)
    examples = tokens.map(_examples, batched=True, fn_kwargs={"fmt": fmt, "max_length": max_length},
                          remove_columns=["key", "empty", "pii", "n_tokens", "n_kept", "eos_labels"])
    if packing:
        examples = examples.map(pack_batch, batched=True, batch_size=PACK_WINDOW, fn_kwargs={"max_length": max_length})
    # One endless pass (the file again and again, same order): the Trainer sees a single epoch,
    # so the batches it skips on resume are exactly the ones trained on, however often it wrapped.
    return examples.repeat(None), fingerprint(spec, field, 0, fmt, source=source, digest=digest)
