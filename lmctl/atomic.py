"""Atomic file and directory writes: a reader (or a process started after a SIGKILL) sees the
old content or the new, never half of either.

Files go through a temp file in the same directory, fsync, then rename; directories are
built in a hidden sibling and renamed into place. The same directory matters: `os.replace`
is atomic only within one filesystem. `crash_point` is the fault injection that proves it:
a process SIGKILLs itself at a named point and the next run must recover.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmctl.errors import BadInputError

log = logging.getLogger("lmctl")


def crash_point(env_var: str, point: str) -> None:
    """SIGKILL this process when the environment variable `env_var` names `point` (fault
    injection for the kill-and-recover tests, and for anyone checking a deployment)."""
    if os.environ.get(env_var) == point:
        log.warning("%s=%s: killing this process now (fault injection)", env_var, point)
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON via a temp file in the same directory, fsync, then rename over `path`."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write text via a temp file in the same directory, fsync, then rename over `path`."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: Path, payload: bytes) -> None:
    """Temp file in the same directory, fsync, rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def require_empty_output(out: Path, force: bool) -> None:
    """An --out directory must be new or empty unless --force: a command never mixes its output
    into someone's files (checked before any work, so a refusal costs nothing)."""
    if out.exists() and not out.is_dir():
        raise BadInputError(f"{out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not force:
        raise BadInputError(f"{out} exists and is not empty", hint="choose another --out or pass --force")


@contextlib.contextmanager
def staging_dir(final: Path, keep_existing: bool = False) -> Iterator[Path]:
    """A hidden sibling directory that becomes `final` only if the block succeeds; its files
    are fsynced before the rename. An existing `final` is replaced, or with `keep_existing`
    kept and ours dropped: for content named by its key (a cache entry), where whoever
    renamed first built the same thing."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".tmp-{final.name}-"))
    try:
        yield tmp
        for path in tmp.rglob("*"):
            if path.is_file():
                with path.open("rb") as fh:
                    os.fsync(fh.fileno())
        _rename_dir(tmp, final, keep_existing)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _rename_dir(tmp: Path, final: Path, keep_existing: bool) -> None:
    if final.exists() and not keep_existing:
        shutil.rmtree(final)
    try:
        os.replace(tmp, final)
    except OSError as exc:
        # Renaming a directory onto a non-empty one fails (ENOTEMPTY, or EEXIST on some
        # systems): with keep_existing that is the other process's finished `final`.
        if not keep_existing or exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        return
    _fsync_dir(final.parent)
