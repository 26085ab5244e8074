"""The data of a training run, ready for the Trainer: examples from the tokenization cache
(lmctl.data.cache) with their rows built lazily, or a stream (lmctl.data.streaming).
`train_fingerprint` is how `retrain` fingerprints the data before training: the same tokenizer
and the same cache entry as the run itself, so the run then reads what the check built."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmctl.config import LmctlConfig
from lmctl.checkpoint import DataFingerprint
from lmctl.data.examples import ExampleSet, example_set
from lmctl.data.packing import Rows
from lmctl.errors import BadInputError


def training_tokenizer(cfg: LmctlConfig) -> tuple[str, Any, list[int]]:
    """(base model path, tokenizer with the config's added tokens, their new ids) of a run."""
    from lmctl.loading import add_tokens, load_tokenizer
    from lmctl.modelref import resolve_base

    base_path = resolve_base(cfg.model.base)
    tokenizer = load_tokenizer(base_path, cfg.model.trust_remote_code, cfg.model.revision)
    return base_path, tokenizer, add_tokens(tokenizer, cfg.model.add_special_tokens)


def _tokens(path: Path, cfg: LmctlConfig, tokenizer: Any) -> Any:
    from lmctl.data.cache import tokenized

    return tokenized(path, cfg.data.text_field, cfg.data.format, tokenizer, cfg.data.max_length, cfg.data.num_proc)


def train_fingerprint(cfg: LmctlConfig) -> DataFingerprint:
    """The fingerprint `lmctl train` will record for data.train: from the cache entry training
    reads (built now on a miss; the run that follows hits it), or from the stream."""
    assert cfg.data.train is not None
    tokenizer = training_tokenizer(cfg)[1]
    if cfg.data.streaming:
        return open_stream(cfg, tokenizer)[1]
    return _tokens(cfg.data.train, cfg, tokenizer).fingerprint


class TrainData:
    """One data set ready for the Trainer: its examples, the rows built from them, its fingerprint."""

    def __init__(self, path: Path | None, cfg: LmctlConfig, tokenizer: Any) -> None:
        from lmctl.data.cache import packing_plan

        self.examples, self.hit = ExampleSet(), None
        self.fingerprint: DataFingerprint | None = None
        self.rows = self.packed = Rows([], None)
        if path is None:
            return
        tokens = _tokens(path, cfg, tokenizer)
        self.examples = example_set(tokens.table, tokens.entry.format, cfg.data.max_length)
        self.fingerprint, self.hit = tokens.fingerprint, tokens.hit
        self.rows = Rows(self.examples.examples, None)
        self.packed = Rows(self.examples.examples, packing_plan(tokens, self.examples.lengths, cfg.data.max_length)
                           if cfg.data.packing else None)

    def rows_for(self, packing: bool) -> Rows:
        return self.packed if packing else self.rows

    @property
    def memory_bytes(self) -> int:
        return self.examples.memory_bytes + self.packed.memory_bytes


def open_stream(cfg: LmctlConfig, tokenizer: Any) -> tuple[Any, DataFingerprint]:
    from lmctl.data.streaming import stream

    if cfg.train.max_steps is None:
        raise BadInputError("data.streaming needs train.max_steps: a stream has no length to count epochs in")
    assert cfg.data.train is not None
    rows, fp = stream(cfg.data.train, cfg.data.text_field, cfg.data.format, tokenizer, cfg.data.max_length,
                      cfg.data.packing)
    return rows, fp


def stream_sample(rows: Any, tokenizer: Any) -> ExampleSet:
    """The first rows of a stream, for the pre-flight lint (a stream cannot be counted ahead)."""
    import itertools

    sample = list(itertools.islice(rows, 64))
    eos = tokenizer.eos_token_id
    return ExampleSet(examples=sample, eos_labels=sum(r["labels"].count(eos) for r in sample) if eos is not None else 0)
