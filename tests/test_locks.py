"""The server lock's rules (lmctl/registry/mutex.py), exercised on the embedded MLflow store:
the lock is the same registered model there as on a team server (the team suite runs it
across processes and SIGKILLs a holder). A lock is broken only by a silent heartbeat."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from lmctl import tracking
from lmctl.errors import BadInputError, BusyError
from lmctl.registry import mutex


@pytest.fixture
def stale_1s(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(mutex.STALE_ENV, "1")  # heartbeat every 0.2 s


def test_second_holder_is_busy_and_told_who_holds_it(stale_1s: None) -> None:
    client = tracking.client()
    with mutex.server_lock(client, "lmctl-lock.t", wait_s=0, what="t is taken"):
        with pytest.raises(BusyError) as busy:
            with mutex.server_lock(client, "lmctl-lock.t", wait_s=0, what="t is taken"):
                pass
    message = str(busy.value)
    assert f"pid {os.getpid()} on {socket.gethostname()} since " in message and "last heartbeat" in message
    assert busy.value.exit_code == 5
    assert mutex.holder(client, "lmctl-lock.t") is None  # released
    with mutex.server_lock(client, "lmctl-lock.t", wait_s=0, what="t is taken"):
        pass


def test_a_slow_but_alive_holder_is_never_broken(monkeypatch: pytest.MonkeyPatch) -> None:
    """Held for more than twice the stale limit: its heartbeat keeps it; a waiter times out."""
    monkeypatch.setenv(mutex.STALE_ENV, "3")  # a beat every 0.6 s: margin for a loaded CI machine
    client = tracking.client()
    holding, release = threading.Event(), threading.Event()

    def slow_holder() -> None:
        with mutex.server_lock(client, "lmctl-lock.slow", wait_s=0, what="slow"):
            holding.set()
            release.wait(30)

    thread = threading.Thread(target=slow_holder)
    thread.start()
    assert holding.wait(30)
    first = mutex.holder(client, "lmctl-lock.slow")
    with pytest.raises(BusyError):
        with mutex.server_lock(client, "lmctl-lock.slow", wait_s=7.0, what="slow"):
            pass
    latest = mutex.holder(client, "lmctl-lock.slow")
    assert latest is not None and first is not None
    assert latest.owner == first.owner and latest.since == first.since and latest.heartbeat > first.heartbeat
    assert time.time() - latest.since > 6.5  # more than twice the stale limit old, still held
    release.set()
    thread.join(30)


def test_a_silent_lock_is_broken_whatever_its_age(stale_1s: None) -> None:
    """What a SIGKILLed holder leaves: the lock with a heartbeat that stopped."""
    client = tracking.client()
    now = time.time()
    client.create_registered_model("lmctl-lock.dead", tags={
        mutex.OWNER_TAG: "gone-host:4242:x", mutex.SINCE_TAG: f"{now - 2:.3f}", mutex.HEARTBEAT_TAG: f"{now - 2:.3f}"})
    with mutex.server_lock(client, "lmctl-lock.dead", wait_s=0, what="dead") as beat:
        held = mutex.holder(client, "lmctl-lock.dead")
        assert held is not None and held.owner == beat.owner and not beat.lost


def test_a_bad_stale_limit_is_bad_input(monkeypatch: pytest.MonkeyPatch) -> None:
    for value in ("0", "-3", "soon"):
        monkeypatch.setenv(mutex.STALE_ENV, value)
        with pytest.raises(BadInputError):
            mutex.stale_after_s()
