"""Hot reload: a server started on models:/NAME@ALIAS follows the alias as it moves.

A poller thread re-resolves the alias every `reload_interval_s`. A new version is loaded
and verified *beside* the serving one; only a fully loaded engine is swapped in, and the
old one is retired after its in-flight requests finish, so no request is dropped. A version
that fails verification, loading or its warm-up generation (lmctl.serve.warmup: a new version
takes traffic warm, and one that cannot generate takes none) is remembered and refused (it is
not retried until the alias moves again); the old version keeps serving.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import deque
from typing import Any

from lmctl.modelref import parse_registry_ref
from lmctl.serve.canary import EVENTS_KEPT, Router
from lmctl.serve.settings import ServeSettings
from lmctl.serve.slots import load_slot
from lmctl.serve.warmup import warm_slot

log = logging.getLogger("lmctl.serve")


def alias_of(ref: str | None) -> tuple[str, str] | None:
    """(NAME, ALIAS) of a models:/NAME@ALIAS reference: the references hot reload follows."""
    spec = parse_registry_ref(ref or "")
    return (spec.name, spec.alias) if spec is not None and spec.alias else None


class AliasFollower:
    def __init__(self, router: Router, settings: ServeSettings, refs: dict[str, str], metrics: Any) -> None:
        self.router = router
        self.settings = settings
        self.targets = {role: alias_of(ref) for role, ref in refs.items() if alias_of(ref)}
        self.metrics = metrics
        self.refused: dict[str, set[str]] = {role: set() for role in self.targets}
        self.events: deque[dict[str, Any]] = deque(maxlen=EVENTS_KEPT)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="alias-follower")

    def start(self) -> None:
        if self.targets:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.reload_interval_s):
            self.check_once()

    def check_once(self) -> None:
        from lmctl import versions

        for role, (name, alias) in self.targets.items():
            current = self.router.primary if role == "primary" else self.router.canary
            try:
                version = versions.version_for_alias(name, alias)
            except Exception as exc:  # registry down or alias deleted: keep serving what we have
                log.warning("cannot re-resolve models:/%s@%s: %s", name, alias, exc)
                continue
            if current is not None and version == current.version or version in self.refused[role]:
                continue
            self._swap(role, name, version, current.model_name if current else name)

    def _swap(self, role: str, name: str, version: str, model_name: str) -> None:
        ref = f"models:/{name}/{version}"
        try:
            slot = load_slot(ref, role, self.settings, model_name=model_name)
        except Exception as exc:  # integrity or load failure: refuse it, keep the old version
            return self._refuse(role, name, version, model_name, f"{type(exc).__name__}: {exc}")
        try:
            warm_slot(slot, self.settings.warmup_tokens)
        except Exception as exc:
            slot.engine.stop(drain=False)
            return self._refuse(role, name, version, model_name, f"warm-up failed: {type(exc).__name__}: {exc}")
        old = self.router.swap(role, slot)
        if old is not None:
            old.retire()
        self._event("reload", role, name, version, f"from version {old.version if old else None}")
        self.metrics.reloads.labels(model_name, version, "swapped").inc()

    def _refuse(self, role: str, name: str, version: str, model_name: str, detail: str) -> None:
        self.refused[role].add(version)
        self._event("reload_refused", role, name, version, detail)
        self.metrics.reloads.labels(model_name, version, "refused").inc()

    def _event(self, kind: str, role: str, name: str, version: str, detail: str) -> None:
        event = {"event": kind, "role": role, "model": name, "version": version, "detail": detail}
        self.events.append(event)
        (log.warning if kind.endswith("refused") else log.info)(json.dumps(event))
