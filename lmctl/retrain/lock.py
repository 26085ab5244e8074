"""One retrain run at a time per registered model: a file lock (embedded) or a server lock (team)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

from lmctl import tracking
from lmctl.atomic import write_json_atomic
from lmctl.clock import utc_now
from lmctl.errors import BusyError
from lmctl.home import lmctl_home


def lock_path(name: str) -> Path:
    return lmctl_home() / "retrain" / f"{name}.lock"


@contextlib.contextmanager
def run_lock(name: str) -> Iterator[Callable[[], bool]]:
    """Hold the one retrain lock of model `name`; BusyError (exit 5) naming the holder if taken.

    Embedded store: a file lock under LMCTL_HOME (the OS frees it when its holder dies). Team
    server: a lock in the server's database, so it reaches every host; its holder's heartbeat
    keeps it, and only a heartbeat silent for LMCTL_LOCK_STALE_S breaks it. Yields a check:
    True once the lock was taken from this process (its heartbeat could not reach the server
    for that long), so the run stops at the next stage instead of racing the new holder."""
    busy, hint = f"a retrain of {name!r} is already running", "wait for it to finish; this run did nothing"
    if not tracking.embedded():
        from lmctl.registry.mutex import RETRAIN_PREFIX, server_lock

        with server_lock(tracking.client(), RETRAIN_PREFIX + name, wait_s=0, what=busy, hint=hint) as beat:
            yield lambda: beat.lost
        return
    from filelock import FileLock, Timeout

    path = lock_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    holder = path.with_suffix(".holder.json")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise BusyError(f"{busy} ({_describe_holder(holder)})", hint=hint) from None
    try:
        write_json_atomic(holder, {"pid": os.getpid(), "host": socket.gethostname(), "since": utc_now()})
        yield lambda: False  # the OS holds a file lock for as long as this process lives
    finally:
        with contextlib.suppress(OSError):
            holder.unlink()
        lock.release()


def lock_holder(name: str) -> str | None:
    """Who holds the retrain lock of `name` (None: nobody), without taking it."""
    if not tracking.embedded():
        from lmctl.registry.mutex import RETRAIN_PREFIX, holder

        held = holder(tracking.client(), RETRAIN_PREFIX + name)
        return held.describe() if held else None
    from filelock import FileLock, Timeout

    path = lock_path(name)
    if not path.exists():
        return None
    try:
        with FileLock(str(path)).acquire(timeout=0):
            return None
    except Timeout:
        return _describe_holder(path.with_suffix(".holder.json"))


def _describe_holder(holder: Path) -> str:
    try:
        info = json.loads(holder.read_text(encoding="utf-8"))
        return f"pid {info['pid']} on {info['host']} since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"
