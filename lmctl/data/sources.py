"""Where a data set lives (one file, a glob, a directory of shards, a `save_to_disk` directory),
how it is read into memory-mapped Arrow, and how its bytes are fingerprinted.

The fingerprint is a sha256 over the bytes of every shard in sorted order (for one file:
exactly its bytes, as lmctl has always recorded, so registry tags of older versions still
match). `Source.unchanged()` compares each shard's stat (size, mtime, ctime, inode,
device) with what it was when the fingerprint was taken: a file rewritten while it was
read is refused, never cached under the old key.

Re-hashing a GB file on every warm run costs seconds (more when it has left the page
cache), so a file's sha256 is remembered with its stat (`file_hex`, under
LMCTL_HOME/cache/digests) and re-read only when the stat differs. This is git's index
rule, and stricter than `datasets`, which identifies a data file by path and mtime alone:
any write through the filesystem changes mtime and ctime, and ctime cannot be set back
(`touch -d`, `cp -p` and `rsync -t` restore mtime but move ctime), so a changed file never
matches a remembered stat. Racy writes are excluded as git does: a hash is remembered only
if the stat did not change while the file was read and the file's last change is older
than RACY_NS, so a write in the same timestamp tick as the hashing cannot go unnoticed.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lmctl.atomic import write_json_atomic
from lmctl.checkpoint import file_digest
from lmctl.errors import DataError
from lmctl.home import cache_dir

NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # disk full, quota exceeded, file size limit
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
SAVED_MARKERS = ("state.json", "dataset_info.json")  # what Dataset.save_to_disk writes next to its shards
# What load_from_disk raises for a damaged directory (checked on real ones): a missing shard
# or state.json (FileNotFoundError), a broken state.json or dataset_info.json
# (JSONDecodeError), features that do not match the shards (ValueError), a state.json without
# its keys (KeyError), a damaged shard (ArrowInvalid). A TypeError or AttributeError (a key of
# the wrong type: `"_data_files": 5`, `"_split": []`) is bad data only when `saved_json_problem`
# finds the wrong type in the directory's JSON; otherwise it stays a bug (it is also what a
# wrong argument in lmctl's call raises).
SAVED_DAMAGE = (OSError, ValueError, KeyError)
RACY_NS = 2_000_000_000  # a file changed this recently may change again within the same timestamp tick

Stat = tuple[int, int, int, int, int]


def file_stat(path: Path) -> Stat:
    """What any write to the file changes: size, mtime, ctime (not settable), inode, device."""
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev


class DigestMemo(BaseModel):
    path: str
    stat: Stat
    sha256: str


def _memo_path(path: Path) -> Path:
    return cache_dir() / "digests" / f"{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]}.json"


def hash_file(path: Path) -> Any:
    """A sha256 object over the file's bytes (read in full), remembered with its stat when safe."""
    before, started = file_stat(path), time.time_ns()
    digest = file_digest(path)
    if file_stat(path) == before and min(before[1], before[2]) < started - RACY_NS:
        memo = DigestMemo(path=str(path.resolve()), stat=before, sha256=digest.hexdigest())
        with contextlib.suppress(OSError):  # a memo that cannot be written only costs a re-read
            write_json_atomic(_memo_path(path), memo.model_dump(mode="json"))
    return digest


def remembered_hex(path: Path) -> str | None:
    """The file's sha256 (hex) as remembered, if its stat is still the one it was hashed with."""
    with contextlib.suppress(OSError, ValueError):
        memo = DigestMemo.model_validate_json(_memo_path(path).read_text())
        if memo.path == str(path.resolve()) and memo.stat == file_stat(path):
            return memo.sha256
    return None


def file_hex(path: Path) -> str:
    """The file's sha256 (hex): the remembered one while its stat is unchanged, else read."""
    return remembered_hex(path) or hash_file(path).hexdigest()


@dataclass
class Source:
    """The files of one data set, in the order their rows are read."""

    spec: Path  # what the user wrote: a file, a glob or a directory
    files: list[Path]
    saved: bool = False  # a save_to_disk directory (files are its shards and metadata)
    stats: list[Stat] = field(default_factory=list)

    @property
    def builder(self) -> str:
        return "arrow" if self.saved else BUILDERS[self.files[0].suffix.lower()]

    @property
    def _one_file(self) -> bool:
        return len(self.files) == 1 and not self.saved

    def bytes_digest(self) -> Any:
        """sha256 over the shards' bytes; a hashlib object so callers can extend a copy. One
        file is read in full (its fingerprint extends the stream of its bytes); the shards of
        a set are combined from their sha256s, which unchanged shards need not re-read."""
        self.stats = [file_stat(f) for f in self.files]
        return hash_file(self.files[0]) if self._one_file else self._shards_digest()

    def content_hex(self) -> tuple[str, Any]:
        """bytes_digest's hex, from remembered digests for files whose stat is unchanged; plus
        the digest itself when one file had to be read for it (None otherwise)."""
        self.stats = [file_stat(f) for f in self.files]
        if not self._one_file:
            return self._shards_digest().hexdigest(), None
        known = remembered_hex(self.files[0])
        if known is not None:
            return known, None
        digest = hash_file(self.files[0])
        return digest.hexdigest(), digest

    def _shards_digest(self) -> Any:
        digest = hashlib.sha256()
        base = self.spec if self.spec.is_dir() else self.spec.parent
        for path in self.files:  # name and content of each shard: renaming or reordering shards changes it
            digest.update(f"{os.path.relpath(path, base)}\0{file_hex(path)}\0".encode())
        return digest

    def unchanged(self) -> bool:
        return bool(self.stats) and self.stats == [file_stat(f) for f in self.files if f.exists()]

    def check_unchanged(self) -> None:
        if not self.unchanged():
            raise self.changed()

    def changed(self) -> DataError:
        return DataError(f"{self.spec}: changed while it was being read; nothing was cached",
                         hint="run again once the file is no longer being written")

    def name_row(self, index: int, offsets: list[int]) -> tuple[Path, int]:
        """(shard file, 1-based row in it) of the dataset's 0-based row `index`."""
        import bisect

        if self.saved or len(offsets) != len(self.files):  # one dataset, or a stream over every shard
            return self.spec, index + 1
        shard = bisect.bisect_right(offsets, index) - 1
        return self.files[shard], index - offsets[shard] + 1


def _shards(paths: list[Path], spec: Path) -> list[Path]:
    suffixes = {p.suffix.lower() for p in paths}
    if len(suffixes) > 1:
        raise DataError(f"{spec}: shards of different formats ({', '.join(sorted(suffixes))})",
                        hint="keep one format per data set")
    suffix = suffixes.pop()
    if suffix not in BUILDERS:
        raise DataError(f"{spec}: unsupported data format {suffix!r}", hint=f"use one of {', '.join(BUILDERS)}")
    return sorted(paths)


def resolve(spec: Path) -> Source:
    """The files behind `spec`: a file, a glob (`train-*.parquet`), a directory of shards, or a
    `save_to_disk` directory. Shards are read in sorted order. Data this process may not read
    is bad input (exit 2), named, before anything is read."""
    try:
        source = _resolve(spec)
    except PermissionError:  # a directory that cannot be listed
        raise _unreadable(spec) from None
    for path in source.files:
        if not os.access(path, os.R_OK):
            raise _unreadable(path)
    return source


def _unreadable(path: Path) -> DataError:
    return DataError(f"{path}: cannot be read (permission denied)",
                     hint=f"make it readable by uid {os.geteuid()}, the user lmctl runs as")


def _resolve(spec: Path) -> Source:
    if spec.is_dir():
        if any((spec / m).is_file() for m in SAVED_MARKERS):
            return Source(spec, sorted(p for p in spec.rglob("*") if p.is_file()), saved=True)
        found = [p for p in spec.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in BUILDERS]
        if not found:
            raise DataError(f"{spec}: no data files in the directory", hint=f"expected {', '.join(BUILDERS)} shards")
        return Source(spec, _shards(found, spec))
    if glob.has_magic(str(spec)):
        found = [Path(p) for p in glob.glob(str(spec)) if Path(p).is_file()]
        if not found:
            raise DataError(f"{spec}: no file matches the pattern")
        return Source(spec, _shards(found, spec))
    if not spec.is_file():
        raise DataError(f"data file not found: {spec}")
    if spec.stat().st_size == 0:
        raise DataError(f"{spec}: the file is empty")
    return Source(spec, _shards([spec], spec))


def load(source: Source, cache_dir: Path, num_proc: int | None = None) -> tuple[Any, list[int]]:
    """The rows as one memory-mapped Arrow `Dataset`, plus the first row index of each shard.

    Shards are loaded one by one (then concatenated, which copies nothing), so an error can
    name the shard and the row inside it.
    """
    from datasets import concatenate_datasets, load_dataset, load_from_disk

    if source.saved:
        try:
            ds = load_from_disk(str(source.spec))
        except SAVED_DAMAGE as exc:
            raise DataError(f"{source.spec}: cannot be read as a saved dataset: {_first_line(exc)}") from exc
        except (TypeError, AttributeError) as exc:  # a bug, unless the directory's JSON has the wrong types
            problem = saved_json_problem(source.spec)
            if problem is None:
                raise
            raise problem from exc
        return _only_split(ds, source.spec), [0]
    parts, offsets = [], []
    builder = source.builder
    kwargs: dict[str, Any] = {"sample_by": "paragraph"} if builder == "text" else {}
    for path in source.files:
        if path.stat().st_size == 0:
            raise DataError(f"{path}: the file is empty")
        try:
            part = load_dataset(builder, data_files=str(path), split="train", cache_dir=str(cache_dir),
                                num_proc=num_proc if num_proc and num_proc > 1 else None, **kwargs)
        except Exception as exc:
            bad = _bad_bytes(exc)
            if bad is None or no_space_cause(exc) is not None:
                raise  # not the file's fault: a bug, or the disk the Arrow conversion goes to is full
            hint = "lmctl reads text as UTF-8; re-encode the file" if isinstance(bad, UnicodeDecodeError) else None
            raise DataError(f"{path}: cannot be read as {builder}: {_first_line(bad)}", hint=hint) from exc
        offsets.append(sum(len(p) for p in parts))
        parts.append(part)
    try:
        ds = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
    except ValueError as exc:  # shards whose columns or types differ
        raise DataError(f"{source.spec}: the shards do not have the same columns: {_first_line(exc)}") from exc
    if ds.num_rows == 0:
        raise DataError(f"{source.spec}: no rows")
    return ds, offsets


class _SavedFile(BaseModel):
    filename: str


class _SavedState(BaseModel):
    """The keys of a `save_to_disk` state.json that `load_from_disk` reads, with their types (datasets 5)."""

    model_config = ConfigDict(strict=True, populate_by_name=True)
    data_files: list[_SavedFile] = Field(alias="_data_files")
    split: str | None = Field(None, alias="_split")
    format_type: str | None = Field(None, alias="_format_type")
    format_columns: list[str] | None = Field(None, alias="_format_columns")
    format_kwargs: dict[str, Any] = Field({}, alias="_format_kwargs")


class _SavedInfo(BaseModel):
    features: dict[str, dict[str, Any]] | None = None


def saved_json_problem(spec: Path) -> DataError | None:
    """What is wrong with the types in a saved dataset's state.json or dataset_info.json, if anything:
    `load_from_disk` meets such a file with a TypeError or AttributeError, which alone would read as a bug."""
    for name, shape in (("state.json", _SavedState), ("dataset_info.json", _SavedInfo)):
        path = spec / name
        if not path.is_file():
            continue
        try:
            shape.model_validate_json(path.read_bytes())
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "the top level"
            return DataError(f"{path}: {where}: {err['msg']} (got {type(err['input']).__name__})",
                             hint="the saved dataset is damaged: save it again with Dataset.save_to_disk")
    return None


def _only_split(ds: Any, spec: Path) -> Any:
    from datasets import DatasetDict

    if isinstance(ds, DatasetDict):
        if "train" not in ds:
            raise DataError(f"{spec}: a saved DatasetDict without a 'train' split", hint="point at one split's directory")
        ds = ds["train"]
    if ds.num_rows == 0:
        raise DataError(f"{spec}: no rows")
    return ds


def _bad_bytes(exc: Exception) -> BaseException | None:
    """The error in `exc` that says the file's bytes are malformed, or None when `exc` is about
    something else (a bug in lmctl or datasets, a full disk), which must not read as bad data.

    What broken files raise (each checked against a real broken file, datasets 5.2): before
    any row is read, pyarrow errors (ArrowInvalid: not Parquet/Arrow, bad footer; OSError
    without an errno: corrupt Parquet metadata). While rows are read, datasets wraps what
    its reader raised in DatasetGenerationError: ArrowInvalid (JSON syntax), plain ValueError
    (pandas' JSON fallback), pandas ParserError/EmptyDataError (CSV), UnicodeDecodeError
    (not UTF-8), OSError without an errno (truncated Arrow stream, corrupt compressed pages).
    A ValueError only counts inside that wrapper: outside it, it is how datasets refuses a
    wrong argument (an unknown split: a bug in lmctl's call, not in the data).
    """
    from datasets.exceptions import DatasetGenerationError
    from pyarrow import ArrowException

    reading = isinstance(exc, DatasetGenerationError)
    cause = exc.__cause__ if reading else exc
    if isinstance(cause, ArrowException) or (reading and isinstance(cause, ValueError)):
        return cause
    if isinstance(cause, OSError) and cause.errno is None:  # pyarrow's I/O status: the bytes, not the disk
        return cause
    return None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def no_space_cause(exc: BaseException) -> OSError | None:
    """The out-of-space OSError behind `exc` (itself, or anywhere in its cause/context chain)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError) and current.errno in NO_SPACE:
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
