"""`retrain()`: one run (or the resumption of an unfinished one) under the model's retrain lock,
stage after stage, each persisted before the next; `status()`; the result and its webhook.
The flow and its skip rules are in the package docstring (lmctl.retrain)."""


from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from lmctl import atomic, tracking, versions
from lmctl.clock import utc_now
from lmctl.config import LmctlConfig
from lmctl.errors import BusyError, LmctlError, PolicyError, exit_code_of
from lmctl.evaluate.compare import Gate
from lmctl.retrain import stages
from lmctl.retrain.context import RetrainContext
from lmctl.retrain.lock import lock_holder, run_lock
from lmctl.retrain.state import Outcome, RetrainState, StageRecord, begin_stage, end_stage, new_run_id
from lmctl.retrain.stores import open_store, versions_in_use

log = logging.getLogger("lmctl.retrain")
REPORT_SCHEMA = "lmctl.retrain/1"
WEBHOOK_ENV = "LMCTL_WEBHOOK_URL"


class RetrainResult(BaseModel):
    schema_version: str = REPORT_SCHEMA
    result: Outcome
    reason: str
    name: str
    run_id: str
    resumed: bool
    data_fingerprint: str | None
    production_before: str | None
    production_after: str | None
    candidate_version: str | None
    checkpoint: str | None
    evaluation: dict[str, object]
    drift: dict[str, object] | None
    gates: list[Gate]
    stages: list[StageRecord]
    eval_report: str | None
    report: str
    seconds: float

    def enforce(self) -> None:
        """The policy outcome: a candidate that was not promoted is exit 3 (PolicyError), after
        the caller has shown the result; promoted and skipped runs pass."""
        from lmctl.evaluate.compare import gate_table

        if self.result == "not_promoted":
            raise PolicyError(f"candidate v{self.candidate_version} not promoted: {self.reason}",
                              hint=f"report: {self.report}", details=gate_table(self.gates) if self.gates else None)


def retrain(cfg: LmctlConfig, config_path: Path | None = None, force: bool = False) -> RetrainResult:
    """Run (or resume) one retraining; the result says promoted, not_promoted or skipped.

    The webhook hears of every outcome but "busy" (a scheduler overlapping itself is not news),
    including invalid input and bugs: a cron job has nobody watching its stderr."""
    webhook = (cfg.retrain.webhook_url or os.environ.get(WEBHOOK_ENV) or None, cfg.retrain.webhook_timeout_s)
    started = time.perf_counter()
    state: RetrainState | None = None
    try:
        with tracking.server_errors():
            ctx = RetrainContext(cfg, config_path, force)
            with run_lock(ctx.name) as lost_lock:
                state = ctx.store.unfinished()
                if state is None:
                    state = RetrainState(run_id=new_run_id(), name=ctx.name, force=force, started_at=utc_now(),
                                         config=str(config_path) if config_path else None)
                else:
                    state.invocations += 1
                    log.info("resuming retrain run %s at stage %s", state.run_id, state.stage)
                result = _run_stages(ctx, state, started, lost_lock)
    except BusyError:
        raise
    except Exception as exc:
        _notify(*webhook, {
            "result": "failed", "name": cfg.registry.name, "run_id": state.run_id if state else None,
            "stage": state.stage if state else None, "exit_code": exit_code_of(exc),
            "error": str(exc) if isinstance(exc, LmctlError) else f"internal error: {type(exc).__name__}: {exc}",
        })
        raise
    _notify(*webhook, result.model_dump(mode="json"))
    return result


def _run_stages(ctx: RetrainContext, state: RetrainState, started: float, lost_lock: Callable[[], bool]) -> RetrainResult:
    steps = {"check_data": stages.check_data, "train": stages.train, "evaluate": stages.evaluate,
             "register": stages.register, "promote": stages.promote}
    while state.stage not in ("report", "done"):
        if lost_lock():
            raise BusyError(f"the retrain lock of {ctx.name!r} was broken while this run was silent; stopped "
                            f"before stage {state.stage}", hint="another host may be resuming this run")
        stage = state.stage
        t0 = begin_stage(ctx.store, state, stage)
        next_stage, note = steps[stage](ctx, state)
        end_stage(ctx.store, state, stage, t0, next_stage, note)
    if state.stage == "report":
        t0 = begin_stage(ctx.store, state, "report")
        state.report = str(ctx.store.run_dir(state.run_id) / "report.json")
        state.record("report").status = "done"  # the report lists itself as done
        atomic.write_json_atomic(Path(state.report), _result(state, started).model_dump(mode="json"))
        end_stage(ctx.store, state, "report", t0, "done")
        ctx.store.prune(ctx.cfg.retrain.keep_runs)
    if ctx.cfg.retrain.keep_versions:
        _collect(ctx)
    return _result(state, started)


def _collect(ctx: RetrainContext) -> None:
    """retrain.keep_versions: registry gc after the run; its failure never changes the run's result."""
    from lmctl.registry.gc import gc

    try:
        done = gc(ctx.name, int(ctx.cfg.retrain.keep_versions or 0), in_use=versions_in_use, yes=True)
    except LmctlError as exc:
        log.warning("warning: registry gc after the run failed (%s); the retrain result stands", exc)
        return
    if done.deleted:
        log.info("registry gc: deleted %s", ", ".join(f"v{v}" for v in done.deleted))


class RetrainStatus(BaseModel):
    """`lmctl retrain --status NAME`: the current or last run, as any host sees it."""

    name: str
    store: str  # where the run states live: a directory, or the tracking server's experiment
    running: bool  # the retrain lock is held
    holder: str | None  # who holds it: pid, host, since (and last heartbeat on a server)
    run: RetrainState | None  # the unfinished run, else the newest one


def status(name: str, state_dir: Path | None = None) -> RetrainStatus:
    versions.validate_name(name)
    with tracking.server_errors():
        store = open_store(name, state_dir)
        run = store.unfinished(fetch=False) or store.latest()
        holder = lock_holder(name)
    where = str(store.root) if tracking.embedded() else f"{tracking.tracking_uri()} experiment lmctl-retrain/{name}"
    return RetrainStatus(name=name, store=where, running=holder is not None, holder=holder, run=run)


def _result(state: RetrainState, started: float) -> RetrainResult:
    assert state.result is not None and state.report is not None
    return RetrainResult(
        result=state.result, reason=state.reason or "", name=state.name, run_id=state.run_id,
        resumed=state.invocations > 1, data_fingerprint=state.data_fingerprint,
        production_before=state.production_before, production_after=state.production_after,
        candidate_version=state.candidate_version, checkpoint=state.checkpoint, evaluation=state.evaluation, drift=state.drift,
        gates=state.gates, stages=state.stages, eval_report=state.eval_report, report=state.report,
        seconds=round(time.perf_counter() - started, 3),
    )


def _notify(url: str | None, timeout_s: float, payload: dict[str, Any]) -> None:
    """POST the result to the webhook; a notification failure never fails the pipeline."""
    if not url:
        return
    import httpx

    try:
        response = httpx.post(url, json=payload, timeout=timeout_s)
        response.raise_for_status()
    except httpx.HTTPStatusError as exc:  # its text holds the URL, which may carry a token: not logged
        log.warning("warning: webhook not delivered (HTTP %d); the retrain result stands", exc.response.status_code)
    except httpx.HTTPError as exc:
        log.warning("warning: webhook not delivered (%s: %s); the retrain result stands", type(exc).__name__, exc)
    else:
        log.info("webhook delivered (HTTP %d)", response.status_code)

