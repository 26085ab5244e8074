"""The alias lock: held while a model's aliases move or its versions are deleted."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from lmctl import tracking


@contextlib.contextmanager
def alias_lock(mlflow_client, name: str) -> Iterator[None]:  # type: ignore[no-untyped-def]
    """Held while the aliases of `name` move or its versions are deleted: the local registry
    lock, and on a team server a lock in the server's database (lmctl.registry.mutex), so
    alias moves and their audit records are serialized across machines too."""
    with tracking.registry_lock():
        if tracking.embedded():
            yield
            return
        from lmctl.registry.mutex import PREFIX, server_lock

        with server_lock(mlflow_client, PREFIX + name, wait_s=tracking.LOCK_TIMEOUT_S,
                         what=f"the alias lock of {name!r} is taken", hint="try again"):
            yield

