"""Gradual rollout: the canary's share of traffic climbs step by step, and a rollout that holds 1.0 promotes it.

A step advances once it has lasted `step_min_s` and the canary served `step_min_requests` in
it, and only while the canary is within the rollback margins of lmctl.serve.canary (error rate
and p95 against the baseline in the same window) and, with `min_agreement`, while the shadow's
greedy agreement stays above the floor. A breach rolls the canary back as a fixed canary is
rolled back. The checks run as canary requests are recorded: no traffic, no evidence, no step.

Promotion: holding 1.0 for its own step moves the registry alias through the registry's own
`promote` (lmctl.registry.promotion), the function `lmctl promote` uses, so the move takes the
alias lock and lands in the audit trail like every other. An eval-report gate compares two
checkpoints offline; here the evidence is live traffic, so the move is recorded as forced with
a reason that states it ("gradual rollout completed: N canary requests ..."). Only a models:/
canary has an alias to move; any other canary completes at 1.0 and says so.

Restart: the state (step, share, outcome) is a small JSON file under LMCTL_HOME/serve/rollouts,
keyed by model, canary version and steps, written atomically at every change. A restarted
server resumes at the recorded step rather than rolling back: the step was earned under the
same margins, and a restart (a node drain, a deploy of the other pod) says nothing about the
canary, so rolling back on every restart would keep a long rollout from ever finishing. The
sliding windows start empty after a restart, so the resumed step must earn its minimum
duration and request count again before it advances. A rolled-back rollout stays rolled back
across restarts: a new canary version (or deleting the file) starts afresh. One stopped
between deciding to promote and the move finishes the promotion (never moving twice).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from pathlib import Path
from typing import Any

from lmctl.atomic import write_json_atomic
from lmctl.clock import utc_now
from lmctl.config import PRODUCTION_ALIAS
from lmctl.modelref import parse_registry_ref
from lmctl.serve.canary import Router
from lmctl.serve.settings import RolloutPolicy
from lmctl.serve.slots import Slot

log = logging.getLogger("lmctl.serve")
SCHEMA = "lmctl.rollout/1"


def state_path(root: Path, model: str, canary_version: str, steps: list[float]) -> Path:
    """The rollout's state file: one per model, canary version and list of steps."""
    key = hashlib.sha256(json.dumps([model, canary_version, steps]).encode()).hexdigest()[:12]
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", f"{model}-v{canary_version}")
    return root / f"{safe}-{key}.json"


def promotion_target(primary_ref: str, canary_ref: str) -> tuple[str, str] | None:
    """(NAME, ALIAS) a completed rollout moves: the primary's alias when it follows models:/NAME@ALIAS,
    else the production alias; None when the canary is not a models:/ reference."""
    canary, primary = parse_registry_ref(canary_ref), parse_registry_ref(primary_ref)
    if canary is None:
        return None
    alias = primary.alias if primary is not None and primary.name == canary.name and primary.alias else None
    return canary.name, alias or PRODUCTION_ALIAS


class Rollout:
    def __init__(self, router: Router, policy: RolloutPolicy, root: Path, target: tuple[str, str] | None,
                 shadow: Any = None) -> None:
        assert policy.steps is not None and router.canary is not None
        self.router, self.policy, self.steps, self.root = router, policy, policy.steps, root
        self.target, self.shadow = target, shadow
        self._lock = threading.RLock()  # a rollback it causes calls back into rolled_back()
        self._start(router.canary)

    # -- state ----------------------------------------------------------------------------
    def _start(self, canary: Slot) -> None:
        self.version = canary.version
        self.path = state_path(self.root, canary.model_name, canary.version, self.steps)
        self.state: dict[str, Any] = {
            "schema": SCHEMA, "model": canary.model_name, "canary_ref": canary.ref, "canary_version": canary.version,
            "baseline_version": self.router.primary.version, "steps": self.steps, "step": 0,
            "weight": self.steps[0], "status": "running", "canary_requests": 0, "promotion": None}
        recorded = json.loads(self.path.read_text(encoding="utf-8")) if self.path.is_file() else None
        if recorded is not None and recorded.get("schema") == SCHEMA:
            self.state = recorded
        self._begin_step()
        self.router.set_weight(self.state["weight"])
        kind = "rollout_started" if recorded is None else "rollout_resumed"
        self._event(kind, f"{self.state['status']} at step {self.state['step'] + 1} of {len(self.steps)} "
                          f"({self.state['weight']:g} of traffic)")
        if self.state["status"] == "rolled_back":
            self.router.roll_back(f"rolled back before the restart: {self.state.get('reason', '')}".strip())
        elif self.state["status"] == "promoting":  # stopped mid-promotion: finish it (a move already made is kept)
            self._promote_later(self.state.get("evidence", {}))

    def _begin_step(self) -> None:
        self.step_started, self.step_requests = time.monotonic(), 0

    def _save(self) -> None:
        self.state["updated_at"] = utc_now()
        write_json_atomic(self.path, self.state)

    def _event(self, kind: str, detail: str, **extra: Any) -> None:
        event = {"event": kind, "at": utc_now(), "model": self.state["model"],
                 "canary_version": self.version, "step": self.state["step"] + 1, "of": len(self.steps),
                 "weight": self.state["weight"], "detail": detail, **extra}
        self.state.setdefault("events", []).append(event)
        self.state["events"] = self.state["events"][-20:]
        self._save()
        self.router.note(event)
        (log.warning if "rolled_back" in kind or "failed" in kind else log.info)(json.dumps(event))

    # -- driving ----------------------------------------------------------------------------
    def observe(self, slot: Slot, ok: bool, latency_s: float) -> None:
        """Every recorded request (Router.observers): count the canary's, advance or roll back when due."""
        if slot.role != "canary":
            return
        with self._lock:
            if slot.version != self.version:  # hot reload swapped in a new canary version: its own rollout
                self._start(slot)
            if self.state["status"] != "running":
                return
            self.step_requests += 1
            self.state["canary_requests"] += 1
        floor = self._agreement_breach()
        if floor is not None:
            self.router.roll_back(floor)
            return
        with self._lock:
            if self.state["status"] == "running" and self._step_done():
                self._advance()

    def _step_done(self) -> bool:
        elapsed = time.monotonic() - self.step_started
        if elapsed < self.policy.step_min_s or self.step_requests < self.policy.step_min_requests:
            return False
        judged = self.router.summaries()["canary"]["requests"] >= self.router.policy.min_requests
        return judged and self.router.canary_active and self.router.breach() is None

    def _agreement_breach(self) -> str | None:
        if self.policy.min_agreement is None or self.shadow is None:
            return None
        agreement, compared = self.shadow.agreement()
        if agreement is None or compared < self.router.policy.min_requests or agreement >= self.policy.min_agreement:
            return None
        return f"shadow agreement {agreement:.1%} over {compared} greedy requests is below {self.policy.min_agreement:.1%}"

    def _advance(self) -> None:  # caller holds the lock
        windows = self.router.summaries()
        evidence = {"canary": windows["canary"], "baseline": windows["primary"], "step_requests": self.step_requests}
        if self.state["step"] + 1 < len(self.steps):
            self.state["step"] += 1
            self.state["weight"] = self.steps[self.state["step"]]
            self.router.set_weight(self.state["weight"])
            self._begin_step()
            self._event("rollout_step", f"advanced to {self.state['weight']:g} of traffic", evidence=evidence)
            return
        self.state["status"], self.state["evidence"] = "promoting", evidence
        self._event("rollout_completed", "held 1.0 within the margins", evidence=evidence)
        self._promote_later(evidence)

    def _promote_later(self, evidence: dict[str, Any]) -> None:
        """Promote off the request path: a registry round trip must not hold up the request that completed the rollout."""
        threading.Thread(target=self._promote, args=(evidence,), daemon=True, name="rollout-promote").start()

    def _promote(self, evidence: dict[str, Any]) -> None:
        if self.target is None:
            with self._lock:
                self.state["status"] = "completed"
                self._event("rollout_not_promoted", "the canary is not a models:/ reference: no alias to move")
            return
        name, alias = self.target
        try:
            result = self._move(name, alias, evidence)
        except Exception as exc:  # LmctlError (policy, registry down) or anything else: say so, keep serving
            with self._lock:
                self.state["status"] = "promotion_failed"
                self._event("rollout_promotion_failed", f"{type(exc).__name__}: {exc}")
            return
        with self._lock:
            self.state["status"], self.state["promotion"] = "promoted", result
            self._event("rollout_promoted", f"models:/{name}@{alias} -> v{self.version}")

    def _move(self, name: str, alias: str, evidence: dict[str, Any]) -> dict[str, Any] | None:
        """Move the alias with `lmctl promote`'s own function; None when it already points at the canary."""
        from lmctl import versions
        from lmctl.registry.promotion import promote

        if versions.alias_holder(name, alias) == self.version:  # moved before a restart, or by hand
            return None
        empty = {"error_rate": 0.0, "p95_ms": 0.0}
        canary, base = evidence.get("canary", empty), evidence.get("baseline", empty)
        reason = (f"gradual rollout completed: {self.state['canary_requests']} canary requests over steps "
                  f"{','.join(f'{s:g}' for s in self.steps)}; error rate {canary['error_rate']:.1%} vs "
                  f"{base['error_rate']:.1%}, p95 {canary['p95_ms']:.0f} ms vs {base['p95_ms']:.0f} ms, within margins")
        result = promote(name, self.version, alias, force=True, reason=reason)
        return {"name": name, "alias": alias, "version": result.version, "previous_version": result.previous_version,
                "at": result.at, "reason": reason}

    def rolled_back(self, event: dict[str, Any]) -> None:
        """The router rolled the canary back (margins or agreement floor): the rollout ends there."""
        with self._lock:
            if event.get("canary_version") != self.version or self.state["status"] == "rolled_back":
                return
            self.state["status"], self.state["reason"] = "rolled_back", event.get("reason")
            self._event("rollout_rolled_back", str(event.get("reason")))

    def report(self) -> dict[str, Any]:
        with self._lock:
            state = {k: v for k, v in self.state.items() if k != "events"}
            return {**state, "state_file": str(self.path), "step_requests": self.step_requests,
                    "step_elapsed_s": round(time.monotonic() - self.step_started, 3),
                    "step_min_s": self.policy.step_min_s, "step_min_requests": self.policy.step_min_requests,
                    "min_agreement": self.policy.min_agreement}


def attach(router: Router, settings: Any, primary_ref: str, shadow: Any) -> Rollout | None:
    """The Rollout of `settings.rollout.steps`, watching every recorded request and reported on /healthz."""
    if settings.rollout.steps is None:
        return None
    from lmctl.home import lmctl_home

    rollout = Rollout(router, settings.rollout, lmctl_home() / "serve" / "rollouts",
                      promotion_target(primary_ref, settings.canary), shadow)
    router.observers.append(rollout.observe)
    router.reporters["rollout"] = rollout.report
    return rollout
