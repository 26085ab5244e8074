"""A mutex that lives on the tracking server, for alias moves made from several machines.

MLflow alias moves are last-writer-wins and lmctl's audit history is a read-modify-write of
one model tag, so two machines promoting the same model at once could each read the old
history and one entry would be lost. A file lock cannot reach the other machine; the server's
database can: `create_registered_model` of a fixed name succeeds for exactly one caller (it
is an INSERT under a unique key). The lock is that model, `lmctl-lock.<name>`, with its owner
and time as tags; releasing deletes it. A holder killed mid-move leaves the lock behind, so a
lock older than STALE_S (an alias move takes well under a second) is broken by the next caller.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

from lmctl.errors import BusyError

PREFIX = "lmctl-lock."
STALE_S = 120.0
OWNER_TAG = "lmctl.lock_owner"
SINCE_TAG = "lmctl.lock_since"


def _holder(mlflow_client: Any, lock: str) -> tuple[str, float] | None:
    """(owner, since) of the lock model, or None when it does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        tags = mlflow_client.get_registered_model(lock).tags or {}
    except MlflowException:
        return None
    return tags.get(OWNER_TAG, "?"), float(tags.get(SINCE_TAG, "0") or 0)


def _try_acquire(mlflow_client: Any, lock: str, owner: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        mlflow_client.create_registered_model(
            lock, tags={OWNER_TAG: owner, SINCE_TAG: f"{time.time():.3f}"},
            description="lmctl: held while an alias of the model is moved; safe to delete when stale")
        return True
    except MlflowException as exc:
        # DOES_NOT_EXIST: the server hit the unique key, then found the holder's lock already
        # released while building its "already exists" answer; contended either way, so retry
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
            raise
        return False


def _delete_if_owned(mlflow_client: Any, lock: str, owner: str) -> None:
    from mlflow.exceptions import MlflowException

    held = _holder(mlflow_client, lock)
    if held is not None and held[0] == owner:
        with contextlib.suppress(MlflowException):  # already broken as stale by someone else
            mlflow_client.delete_registered_model(lock)


@contextlib.contextmanager
def server_mutex(mlflow_client: Any, name: str, timeout_s: float) -> Iterator[None]:
    """Hold `lmctl-lock.<name>` on the tracking server; BusyError (exit 5) after `timeout_s`."""
    lock = PREFIX + name
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + timeout_s
    while not _try_acquire(mlflow_client, lock, owner):
        held = _holder(mlflow_client, lock)
        if held is not None and time.time() - held[1] > STALE_S:
            # the holder died mid-move; delete only the lock we judged stale, not a fresh one
            _delete_if_owned(mlflow_client, lock, held[0])
            continue
        if time.monotonic() > deadline:
            raise BusyError(f"registry lock {lock!r} is held by {held[0] if held else '?'}; try again")
        time.sleep(random.uniform(0.05, 0.25))  # jitter: waiting machines do not retry in lockstep
    try:
        yield
    finally:
        _delete_if_owned(mlflow_client, lock, owner)
