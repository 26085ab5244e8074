"""Routing between the primary version and a canary, and the canary's automatic rollback.

Both versions' outcomes go into sliding windows of the same length; the canary is judged
against the baseline *in the same window*, so a slow machine or a traffic burst that hurts
both does not trip it. Only server faults (5xx, timeouts) count as errors: a client's bad
request says nothing about the model. Once rolled back the canary gets no traffic until a
new canary version is swapped in (hot reload), which starts it afresh.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import threading
import time
from collections import deque
from typing import Any, Callable

from lmctl import stats
from lmctl.clock import utc_now
from lmctl.serve.settings import CanaryPolicy
from lmctl.serve.slots import Slot

log = logging.getLogger("lmctl.serve")
# Canary and reload events kept in memory for /healthz (each is also logged); a server that
# runs for months must not grow a list of every event it ever had.
EVENTS_KEPT = 100


class Window:
    """(time, ok, latency) of recent requests, pruned to the last `span_s` seconds."""

    def __init__(self, span_s: float) -> None:
        self.span_s = span_s
        self.items: deque[tuple[float, bool, float]] = deque()

    def add(self, ok: bool, latency_s: float, now: float) -> None:
        self.items.append((now, ok, latency_s))
        self.prune(now)

    def prune(self, now: float) -> None:
        while self.items and self.items[0][0] < now - self.span_s:
            self.items.popleft()

    def summary(self) -> dict[str, float]:
        n = len(self.items)
        if n == 0:
            return {"requests": 0, "error_rate": 0.0, "p95_ms": 0.0}
        errors = sum(1 for item in self.items if not item[1])
        p95 = stats.percentile([item[2] for item in self.items], 0.95)  # the same p95 as `eval --latency`
        return {"requests": n, "error_rate": errors / n, "p95_ms": p95 * 1000.0}


class Router:
    def __init__(self, primary: Slot, canary: Slot | None, weight: float, policy: CanaryPolicy,
                 on_rollback: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.primary = primary
        self.canary = canary
        self.weight = weight
        self.policy = policy
        self.on_rollback = on_rollback
        # what else watches the canary (lmctl.serve.rollout): told of every recorded request, outside the lock
        self.observers: list[Callable[[Slot, bool, float], None]] = []
        # extra sections of state() (/healthz), e.g. "shadow" and "rollout", each read at call time
        self.reporters: dict[str, Callable[[], Any]] = {}
        self.extra_slots: list[Slot] = []  # loaded versions that take no routed traffic (a shadow's own)
        self.canary_active = canary is not None
        self.events: deque[dict[str, Any]] = deque(maxlen=EVENTS_KEPT)
        self._lock = threading.Lock()
        self._random = random.Random()
        self._reset_windows()

    def _reset_windows(self) -> None:
        self._windows = {"primary": Window(self.policy.window_s), "canary": Window(self.policy.window_s)}

    def slots(self) -> list[Slot]:
        with self._lock:
            return [s for s in (self.primary, self.canary, *self.extra_slots) if s is not None]

    def pick(self, sticky_key: str | None) -> Slot:
        """The canary gets `weight` of traffic; a sticky key (client header or `user`) always lands the same way."""
        with self._lock:
            if not (self.canary_active and self.canary is not None and self.weight > 0):
                return self.primary
            if sticky_key:
                digest = hashlib.sha256(sticky_key.encode()).digest()
                share = int.from_bytes(digest[:8], "big") / 2**64
            else:
                share = self._random.random()
            return self.canary if share < self.weight else self.primary

    def record(self, slot: Slot, ok: bool, latency_s: float) -> None:
        with self._lock:
            if slot is not self.primary and slot is not self.canary:
                return  # a retired version finishing its last requests
            now = time.monotonic()
            self._windows[slot.role].add(ok, latency_s, now)
            event = None
            if self.canary_active and slot.role == "canary":
                self._windows["primary"].prune(now)
                reason = self._breach()
                event = self._rolled_back(reason) if reason is not None else None
        if event is not None:
            self._announce(event)
        for observer in self.observers:
            observer(slot, ok, latency_s)

    def roll_back(self, reason: str) -> bool:
        """Take the canary out of traffic for `reason` (e.g. a rollout's agreement floor); False if it already was."""
        with self._lock:
            if not (self.canary_active and self.canary is not None):
                return False
            event = self._rolled_back(reason)
        self._announce(event)
        return True

    def _rolled_back(self, reason: str) -> dict[str, Any]:  # caller holds the lock
        event = self._rollback_event(reason)
        self.canary_active = False
        self.events.append(event)
        return event

    def _announce(self, event: dict[str, Any]) -> None:
        log.warning(json.dumps(event))
        if self.on_rollback is not None:
            self.on_rollback(event)

    def note(self, event: dict[str, Any]) -> None:
        """An event of the canary's life (a rollout step) for /healthz."""
        with self._lock:
            self.events.append(event)

    def set_weight(self, weight: float) -> None:
        with self._lock:
            self.weight = weight

    def summaries(self) -> dict[str, dict[str, float]]:
        """Both windows' request count, error rate and p95, pruned to now."""
        with self._lock:
            now = time.monotonic()
            for window in self._windows.values():
                window.prune(now)
            return {role: window.summary() for role, window in self._windows.items()}

    def breach(self) -> str | None:
        """Why the canary is outside its margins now, or None (also None while too few requests to judge)."""
        with self._lock:
            now = time.monotonic()
            for window in self._windows.values():
                window.prune(now)
            return self._breach()

    def _breach(self) -> str | None:
        canary, base = self._windows["canary"].summary(), self._windows["primary"].summary()
        if canary["requests"] < self.policy.min_requests:
            return None
        if canary["error_rate"] - base["error_rate"] > self.policy.max_error_rate_margin:
            return (f"error rate {canary['error_rate']:.1%} exceeds baseline {base['error_rate']:.1%} "
                    f"by more than {self.policy.max_error_rate_margin:.1%}")
        limit = base["p95_ms"] * (1 + self.policy.max_p95_margin_pct / 100)
        if base["requests"] >= self.policy.min_requests and canary["p95_ms"] > limit:
            return (f"p95 latency {canary['p95_ms']:.0f} ms exceeds baseline {base['p95_ms']:.0f} ms "
                    f"by more than {self.policy.max_p95_margin_pct:g}%")
        return None

    def _rollback_event(self, reason: str) -> dict[str, Any]:
        assert self.canary is not None
        return {"event": "canary_rollback", "at": utc_now(),
                "model": self.primary.model_name, "canary_ref": self.canary.ref, "canary_version": self.canary.version,
                "baseline_version": self.primary.version, "reason": reason,
                "canary": self._windows["canary"].summary(), "baseline": self._windows["primary"].summary()}

    def swap(self, role: str, slot: Slot) -> Slot | None:
        """Put `slot` in place of the current one for `role`; return the old one for retiring."""
        with self._lock:
            old = self.primary if role == "primary" else self.canary
            if role == "primary":
                self.primary = slot
            else:
                self.canary, self.canary_active = slot, True
            self._windows[role] = Window(self.policy.window_s)
            return old

    def state(self) -> dict[str, Any]:
        with self._lock:
            canary = None
            if self.canary is not None:
                canary = {**self.canary.describe(), "weight": self.weight,
                          "state": "active" if self.canary_active else "rolled_back",
                          "window": self._windows["canary"].summary()}
            state = {"primary": {**self.primary.describe(), "window": self._windows["primary"].summary()},
                     "canary": canary, "events": list(self.events)[-10:]}
        return {**state, **{name: report() for name, report in self.reporters.items()}}
