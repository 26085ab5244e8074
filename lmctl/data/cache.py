"""The tokenization cache under `LMCTL_HOME/cache/tokens`: tokenize a data set once, reuse it
in `train`, `--resume`, `--dry-run`, `retrain`, `data validate` and `eval`.

An entry is keyed by a sha256 over: the data's bytes (every shard, sorted), the tokenizer's
full serialization and behaviour (lmctl.tokenizer_lock), the declared format, the text
field, max_length and the shaping rules (SHAPING). `eval`'s entries (purpose "eval",
lmctl.data.documents) hold whole documents instead of training examples: their key has
EVAL_SHAPING and no max_length, since windows are cut from the documents when scoring.
An entry holds the Arrow files that `Dataset.map(cache_file_name=...)` wrote, plus
`entry.json` with each file's sha256 and size.

Writes are atomic (lmctl.atomic.staging_dir): the entry is built in a hidden `.tmp-*`
sibling, `entry.json` is written last, every file is fsynced and the directory is renamed
into place; when another process renamed its entry for the same key first, theirs is kept.
An entry that fails verification (partial, corrupt, edited) is removed and rebuilt, never
trusted.

Verification is stat-based with a content hash behind it, because re-hashing the data and
a GB of Arrow on every warm run cost seconds of a dry-run that should take a few. The data's
sha256 is remembered with its stat (lmctl.data.sources: git's index rule; ctime cannot be
set back, so a changed file always misses). Each Arrow file's sha256 is taken when it is
written, and the file is then *sealed*: its mtime is set a second into the past and its
stat recorded in `entry.json`. A reader trusts a file whose size and stat are still the
sealed ones; any write since (a flipped byte, a truncation, a copy put in place, even
within the same timestamp tick) changes mtime and ctime, so the file is re-hashed against
its recorded sha256 and the entry rebuilt on a mismatch, or re-sealed when it still matches
(an entry copied with the cache, or written before sealing existed). What this gives up
against re-hashing on every read is the detection of media corruption that bypasses the
filesystem: the same trust `datasets` puts in its own Arrow cache, which it never re-hashes.
A data file that changed while it was read is refused (exit 2) and not cached. A
full disk fails with StorageError (exit 6) and leaves no entry. The raw Arrow conversion
that `load_dataset` makes is built inside the staging directory and dropped: an entry holds
only what later runs read.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from lmctl import pii
from lmctl.atomic import staging_dir, write_json_atomic
from lmctl.checkpoint import DataFingerprint, FileEntry, sha256_file, sha256_json
from lmctl.data.records import (Format, RowNamer, check_rows, check_text_field, detect_format, field_for,
                                fingerprint, location)
from lmctl.data.documents import EVAL_SHAPING, DocumentsTokenize, document_features
from lmctl.data.examples import Tokenize, check_tokenizer, features
from lmctl.data.sources import Source, Stat, file_stat, load, no_space_cause, resolve
from lmctl.errors import DataError, StorageError
from lmctl.home import cache_dir

log = logging.getLogger("lmctl.data.cache")
SCHEMA = "lmctl.tokens/1"
# Bump when Tokenize changes what it writes: every older entry then misses (its PII findings
# follow lmctl.pii.SIGNATURE on their own).
SHAPING = {"text": "document + EOS, add_special_tokens", "completion": "prompt(+special) completion EOS, truncate",
           "chat": "chat template, assistant spans, truncate", "version": 1, "pii": pii.SIGNATURE}
Purpose = Literal["train", "eval"]  # train: examples (lmctl.data.examples); eval: documents (lmctl.data.documents)
STALE_STAGING_S = 6 * 3600  # `cache clear` leaves younger staging dirs alone: a build may be running


class CacheEntry(BaseModel):
    schema_version: str = SCHEMA
    key: str
    created_at: str
    source: str
    rows: int
    format: str
    text_field: str
    tokenizer: str | None
    max_length: int
    data: DataFingerprint
    files: dict[str, FileEntry]
    sealed: dict[str, Stat] = {}  # each file's stat once hashed and sealed (_seal); older entries: none
    purpose: str = "train"  # entries written before eval used the cache are training entries


@dataclass
class Tokenized:
    """A data set's tokenized table (memory-mapped) and how it was read."""

    table: Any
    entry: CacheEntry
    path: Path
    hit: bool
    spec: Path | None = None  # the data as asked for now (the entry may have been built from another path)

    @property
    def fingerprint(self) -> DataFingerprint:
        """The entry's fingerprint (the same bytes, read the same way), naming the data where it is now."""
        if self.spec is None:
            return self.entry.data
        return self.entry.data.model_copy(update={"path": location(self.spec)})


def root() -> Path:
    return cache_dir() / "tokens"


def tokenizer_key(tokenizer: Any) -> str:
    """sha256 over everything that decides how a tokenizer splits text: its serialized model
    (vocabulary, merges, normalizer, added tokens) and its behaviour fingerprint."""
    from lmctl.tokenizer_lock import tokenizer_behaviour

    backend = getattr(tokenizer, "backend_tokenizer", None)
    serialized = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    return sha256_json({"serialized": serialized, "behaviour": tokenizer_behaviour(tokenizer)})


def default_num_proc(rows_hint: int) -> int | None:
    """All cores this process may use, for files big enough to pay for worker start-up."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores if cores > 1 and rows_hint >= 20_000 else None


def tokenized(spec: Path, text_field: str, declared: Format, tokenizer: Any | None, max_length: int,
              num_proc: int | None = None, purpose: Purpose = "train") -> Tokenized:
    """The cached table for these inputs, built (atomically) on a miss. An eval entry holds
    whole documents: it does not depend on max_length (windows are cut when scoring)."""
    source = resolve(spec)
    data_hex, read = source.content_hex()
    tok_key = tokenizer_key(tokenizer) if tokenizer is not None else None
    if purpose == "eval":
        declared, max_length = "text", 0
    key = sha256_json({"schema": SCHEMA, "data": data_hex, "text_field": text_field, "format": declared,
                       "tokenizer": tok_key, "max_length": max_length if tok_key else None,
                       "shaping": SHAPING if purpose == "train" else EVAL_SHAPING})
    entry_dir = root() / key[:32]
    found = _open(entry_dir, key)
    if found is not None:
        return replace(found, spec=spec)
    recipe = _Recipe(purpose, text_field, declared, tokenizer, tok_key, max_length, num_proc)
    _build(entry_dir, key, source, data_hex, read, recipe)
    built = _open(entry_dir, key, hit=False)
    if built is None:  # only if someone corrupted it between our rename and our read
        raise StorageError(f"{entry_dir}: the cache entry just written does not verify")
    return replace(built, spec=spec)


def _open(entry_dir: Path, key: str, hit: bool = True) -> Tokenized | None:
    """The verified entry, or None (a bad entry is removed so it is rebuilt)."""
    from datasets import Dataset, concatenate_datasets

    if not entry_dir.is_dir():
        return None
    entry, problem = _verified(entry_dir, key)
    if entry is None or problem:
        log.warning("warning: cache entry %s is %s; rebuilding it", entry_dir.name, problem)
        shutil.rmtree(entry_dir, ignore_errors=True)
        return None
    parts = [Dataset.from_file(str(entry_dir / name)) for name in sorted(entry.files)]
    table = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
    return Tokenized(table=table, entry=entry, path=entry_dir, hit=hit)


def _verified(entry_dir: Path, key: str) -> tuple[CacheEntry | None, str | None]:
    """(entry, None) when every file is whole and unchanged, else (entry or None, problem).
    A file whose stat is still the sealed one is trusted; any other is re-hashed, then sealed."""
    try:
        entry = CacheEntry.model_validate_json((entry_dir / "entry.json").read_text())
    except (OSError, ValueError):
        return None, "partial (no valid entry.json)"
    if entry.key != key:
        return entry, "filed under the wrong key"
    rehashed = []
    for name, want in entry.files.items():
        path = entry_dir / name
        if not path.is_file() or path.stat().st_size != want.size:
            return entry, f"partial ({name} is missing or truncated)"
        if entry.sealed.get(name) == file_stat(path):
            continue  # untouched since it was hashed and sealed
        if sha256_file(path) != want.sha256:
            return entry, f"corrupt ({name} does not match its sha256)"
        rehashed.append(name)
    if rehashed:  # an older entry, or one copied or touched: the next read needs no re-hash
        with contextlib.suppress(OSError):  # a read-only cache stays correct, only slower
            entry.sealed |= _seal(entry_dir, rehashed)
            write_json_atomic(entry_dir / "entry.json", entry.model_dump(mode="json"))
    return entry, None


def _seal(directory: Path, names: list[str]) -> dict[str, Stat]:
    """Set each file's mtime to a second before now and return its stat. Any later write sets
    mtime to the time of that write and moves ctime, so the file never matches this stat
    again, even when the write falls in the same timestamp tick as the seal."""
    past = (time.time_ns() // 1_000_000_000 - 1) * 1_000_000_000
    sealed = {}
    for name in names:
        path = directory / name
        os.utime(path, ns=(path.stat().st_atime_ns, past))
        sealed[name] = file_stat(path)
    return sealed


@dataclass(frozen=True)
class _Recipe:
    """What an entry is made from, besides the data: how its rows are checked and tokenized."""

    purpose: Purpose
    text_field: str
    declared: Format
    tokenizer: Any | None
    tok_key: str | None
    max_length: int
    num_proc: int | None

    def map_fn(self, source: Source, raw: Any, namer: RowNamer) -> tuple[str, Any, Any]:
        """(format, batched map function, output features); raises DataError on a bad row."""
        field = field_for(source, self.text_field)
        fmt = detect_format(source.spec, raw, field, self.declared)
        if self.purpose == "eval":
            check_text_field(source.spec, raw, field)
        elif self.tokenizer is not None:
            check_tokenizer(source.spec, fmt, self.tokenizer)
        check_rows(source.spec, raw, fmt, field, namer)  # a bad row fails in seconds, before any tokenizing
        if self.purpose == "eval":
            return fmt, DocumentsTokenize(field, self.tokenizer), document_features()
        return fmt, Tokenize(fmt, field, namer, self.tokenizer, self.max_length), features(self.tokenizer is not None)


def _build(entry_dir: Path, key: str, source: Source, data_hex: str, read: Any, recipe: _Recipe) -> None:
    """`read`: the data's digest if the key's hex was just read, else it is read now, and must
    be the bytes the key was made from (a remembered hex is checked before anything is cached)."""
    digest = read if read is not None else source.bytes_digest()
    if digest.hexdigest() != data_hex:
        raise source.changed()
    # keep_existing: a process that built the same key first keeps its entry
    with _no_space_is_storage_error(entry_dir.parent), staging_dir(entry_dir, keep_existing=True) as stage:
        entry = _tokenize_into(stage, key, source, digest, recipe)
        source.check_unchanged()
        _drop_scratch(stage)
        entry.sealed = _seal(stage, list(entry.files))
        write_json_atomic(stage / "entry.json", entry.model_dump(mode="json"))


def _tokenize_into(stage: Path, key: str, source: Source, digest: Any, recipe: _Recipe) -> CacheEntry:
    raw, offsets = load(source, stage / "raw")
    namer = RowNamer(source, offsets)
    fmt, fn, out_features = recipe.map_fn(source, raw, namer)
    field = field_for(source, recipe.text_field)
    procs = recipe.num_proc if recipe.num_proc is not None else default_num_proc(raw.num_rows)
    eval_ = recipe.purpose == "eval"  # an eval map drops empty documents: no row indices to pass
    table = raw.map(fn, batched=True, with_indices=not eval_, remove_columns=raw.column_names, features=out_features,
                    num_proc=procs if procs and procs > 1 else None,
                    cache_file_name=str(stage / "tokens.arrow"), desc=f"Tokenizing {source.spec.name}")
    rows = table.num_rows
    del table, raw  # release the memory maps before the raw conversion is deleted
    shutil.rmtree(stage / "raw", ignore_errors=True)
    if eval_ and rows == 0:
        raise DataError(f"{source.spec}: no non-empty text in field {field!r}")
    files = {p.name: FileEntry(sha256=sha256_file(p), size=p.stat().st_size)
             for p in sorted(stage.glob("tokens*.arrow"))}
    return CacheEntry(key=key, created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      source=str(source.spec), rows=rows, format=fmt, text_field=field, tokenizer=recipe.tok_key,
                      max_length=recipe.max_length, data=fingerprint(source.spec, field, rows, fmt, digest=digest),
                      files=files, purpose=recipe.purpose)


def _drop_scratch(stage: Path) -> None:
    """Remove datasets' own scratch files from the stage: an entry holds only its tokens."""
    for path in stage.iterdir():
        if path.name.startswith("cache-") or path.is_dir():
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink()


@contextlib.contextmanager
def _no_space_is_storage_error(where: Path) -> Any:
    try:
        yield
    except Exception as exc:  # datasets may wrap the OSError of a failed write in its own errors
        if no_space_cause(exc) is None:
            raise
        raise StorageError(f"no space left to write the tokenization cache in {where}; nothing was cached",
                           hint="free disk space, `lmctl data cache clear`, or set LMCTL_HOME to a larger disk") from exc


class EntryInfo(BaseModel):
    key: str
    bytes: int
    status: str  # "ok", or "partial" for a directory without a valid entry.json
    source: str | None = None
    format: str | None = None
    rows: int | None = None
    max_length: int | None = None
    tokenized: bool | None = None  # False: only the scan columns (validate without a tokenizer)
    purpose: str | None = None  # "train" (examples) or "eval" (whole documents)
    created_at: str | None = None


class CacheListing(BaseModel):
    path: str
    entries: list[EntryInfo]
    partial: int  # unfinished staging directories (a running build, or one a kill interrupted)
    total_bytes: int


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _info(path: Path) -> EntryInfo:
    try:
        entry = CacheEntry.model_validate_json((path / "entry.json").read_text())
    except (OSError, ValueError):
        return EntryInfo(key=path.name, bytes=_size(path), status="partial")
    return EntryInfo(key=path.name, bytes=_size(path), status="ok", source=entry.source, format=entry.format,
                     rows=entry.rows, max_length=entry.max_length, tokenized=entry.tokenizer is not None,
                     purpose=entry.purpose, created_at=entry.created_at)


def listing() -> CacheListing:
    """Every entry with its source, rows and size; `partial` counts unfinished staging dirs."""
    base = root()
    paths = sorted(base.iterdir()) if base.is_dir() else []
    staging = [p for p in paths if p.name.startswith(".tmp-")]
    entries = [_info(p) for p in paths if p not in staging]
    return CacheListing(path=str(base), entries=entries, partial=len(staging),
                        total_bytes=sum(e.bytes for e in entries) + sum(_size(p) for p in staging))


class CacheCleared(BaseModel):
    path: str
    removed: int
    freed_bytes: int


def clear() -> CacheCleared:
    """Remove every entry and stale staging directory (a fresh one may belong to a running build)."""
    base = root()
    removed, freed = 0, 0
    for path in list(base.iterdir()) if base.is_dir() else []:
        if path.name.startswith(".tmp-") and time.time() - path.stat().st_mtime < STALE_STAGING_S:
            continue
        size = _size(path)
        shutil.rmtree(path, ignore_errors=True)
        removed, freed = removed + 1, freed + size
    return CacheCleared(path=str(base), removed=removed, freed_bytes=freed)


def packing_plan(tokens: Tokenized, lengths: Any, max_length: int) -> tuple[Any, Any]:
    """The best-fit packing plan of an entry's examples, computed once and kept next to it.

    The plan file is derived data: it is checked on every read (a permutation of the
    examples, no row longer than max_length) and recomputed when it fails, or when it cannot
    be written (a full disk only costs the recomputation next time).
    """
    import io

    import numpy as np

    from lmctl.atomic import write_bytes_atomic
    from lmctl.data.packing import pack_plan

    path = tokens.path / "pack.npz"
    with contextlib.suppress(OSError, ValueError, KeyError):
        with np.load(path) as saved:
            order, starts = saved["order"], saved["starts"]
        if _plan_fits(order, starts, lengths, max_length):
            return order, starts
    order, starts = pack_plan(lengths, max_length)
    buffer = io.BytesIO()
    np.savez(buffer, order=order, starts=starts)
    with contextlib.suppress(OSError):
        write_bytes_atomic(path, buffer.getvalue())
    return order, starts


def _plan_fits(order: Any, starts: Any, lengths: Any, max_length: int) -> bool:
    import numpy as np

    if len(order) != len(lengths) or starts[0] != 0 or starts[-1] != len(order) or np.any(np.diff(starts) <= 0):
        return False
    if len(order) and (order.min() < 0 or order.max() >= len(lengths) or np.any(np.bincount(order) != 1)):
        return False
    return not len(order) or bool((np.add.reduceat(lengths[order], starts[:-1]) <= max_length).all())
