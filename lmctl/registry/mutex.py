"""Locks that live on the tracking server, for lmctl processes on several machines.

A file lock cannot reach another machine; the server's database can, and MLflow's client
offers one atomic primitive through it: `create_registered_model` of a fixed name succeeds
for exactly one caller (an INSERT under a unique key). A lock is that model (`lmctl-lock.NAME`
for alias moves, `lmctl-retrain-lock.NAME` for a retrain run), tagged with its holder's
host, pid, start time and heartbeat; releasing deletes it. filelock and friends only know
local files, hence this module.

The holder runs a heartbeat thread that re-tags `lmctl.lock_heartbeat` every few seconds.
A lock is broken only when its heartbeat is older than the stale limit (`LMCTL_LOCK_STALE_S`,
default 300 s): its holder was killed or lost its host. A holder that is alive, however long
its work takes (a retrain holds its lock for the whole training run), keeps beating and is
never broken; the age of a lock alone breaks nothing. Hosts' clocks must agree to well
within the stale limit (NTP does), since a heartbeat is one host's time read by another.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from lmctl.clock import seconds_from_env
from lmctl.errors import BusyError

log = logging.getLogger("lmctl.registry")
PREFIX = "lmctl-lock."  # + model name: alias moves of that model
RETRAIN_PREFIX = "lmctl-retrain-lock."  # + model name: its one retrain run
STALE_ENV = "LMCTL_LOCK_STALE_S"
DEFAULT_STALE_S = 300.0
OWNER_TAG = "lmctl.lock_owner"
SINCE_TAG = "lmctl.lock_since"
HEARTBEAT_TAG = "lmctl.lock_heartbeat"


def stale_after_s() -> float:
    """Seconds without a heartbeat after which a lock counts as abandoned."""
    return seconds_from_env(STALE_ENV, DEFAULT_STALE_S)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Holder:
    owner: str  # host:pid:nonce
    since: float
    heartbeat: float

    def silent_s(self) -> float:
        return time.time() - self.heartbeat

    def describe(self) -> str:
        host, pid = (self.owner.split(":") + ["?", "?"])[:2]
        return (f"pid {pid} on {host} since {_iso(self.since)}, last heartbeat {_iso(self.heartbeat)} "
                f"({self.silent_s():.0f}s ago)")


def holder(mlflow_client: Any, lock: str) -> Holder | None:
    """Who holds `lock`, or None when nobody does."""
    from mlflow.exceptions import MlflowException

    try:
        tags = mlflow_client.get_registered_model(lock).tags or {}
    except MlflowException:
        return None
    since = float(tags.get(SINCE_TAG, "0") or 0)
    # a lock written by lmctl before heartbeats: its start time is its only sign of life
    return Holder(tags.get(OWNER_TAG, "?"), since, float(tags.get(HEARTBEAT_TAG, since) or since))


def _try_acquire(mlflow_client: Any, lock: str, owner: str) -> bool:
    from mlflow.exceptions import MlflowException

    now = f"{time.time():.3f}"
    try:
        mlflow_client.create_registered_model(
            lock, tags={OWNER_TAG: owner, SINCE_TAG: now, HEARTBEAT_TAG: now},
            description="lmctl lock (see lmctl/registry/mutex.py): exists while held; broken when its "
                        "heartbeat is stale")
        return True
    except MlflowException as exc:
        # DOES_NOT_EXIST: the server hit the unique key, then found the holder's lock already
        # released while building its "already exists" answer; contended either way, so retry
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
            raise
        return False


def _delete_if(mlflow_client: Any, lock: str, expected: Holder) -> None:
    """Delete `lock` if it is still exactly as judged (same owner, no newer heartbeat)."""
    from mlflow.exceptions import MlflowException

    if holder(mlflow_client, lock) == expected:
        with contextlib.suppress(MlflowException):  # already broken or released by someone else
            mlflow_client.delete_registered_model(lock)


class _Heartbeat(threading.Thread):
    """Re-tags the lock's heartbeat until stopped; notes when the lock was taken from us."""

    def __init__(self, mlflow_client: Any, lock: str, owner: str, interval_s: float) -> None:
        super().__init__(name=f"lmctl-heartbeat-{lock}", daemon=True)
        self.client, self.lock, self.owner, self.interval_s = mlflow_client, lock, owner, interval_s
        self.stopped = threading.Event()
        self.lost = False

    def run(self) -> None:
        from mlflow.exceptions import MlflowException

        while not self.stopped.wait(self.interval_s):
            try:
                current = holder(self.client, self.lock)
                if current is None or current.owner != self.owner:
                    self.lost = True
                    log.error("lost the server lock %s (broken as stale: this host was silent too long)", self.lock)
                    return
                self.client.set_registered_model_tag(self.lock, HEARTBEAT_TAG, f"{time.time():.3f}")
            except (MlflowException, OSError) as exc:  # server briefly away: keep trying until stale
                log.warning("warning: lock heartbeat not sent (%s); retrying", str(exc).splitlines()[0][:200])


@contextlib.contextmanager
def server_lock(mlflow_client: Any, lock: str, *, wait_s: float, what: str, hint: str | None = None) -> Iterator[_Heartbeat]:
    """Hold `lock` on the tracking server, beating while held; BusyError (exit 5) naming the
    holder when it is still held after `wait_s` (0: one try)."""
    stale_s = stale_after_s()
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + wait_s
    while not _try_acquire(mlflow_client, lock, owner):
        held = holder(mlflow_client, lock)
        if held is not None and held.silent_s() > stale_s:
            log.warning("breaking the server lock %s: its holder (%s) is gone", lock, held.describe())
            _delete_if(mlflow_client, lock, held)
            continue
        if held is not None and time.monotonic() >= deadline:
            raise BusyError(f"{what}: held by {held.describe()}",
                            hint=hint or f"a lock is broken only after {stale_s:.0f}s without a heartbeat")
        time.sleep(random.uniform(0.05, 0.25))  # jitter: waiting machines do not retry in lockstep
    beat = _Heartbeat(mlflow_client, lock, owner, interval_s=min(30.0, stale_s / 5))
    beat.start()
    try:
        yield beat
    finally:
        beat.stopped.set()
        beat.join(timeout=5)
        mine = holder(mlflow_client, lock)
        if mine is not None and mine.owner == owner:
            _delete_if(mlflow_client, lock, mine)
