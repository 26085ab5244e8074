"""`lmctl retrain CONFIG`: the scheduled pipeline, one run at a time per registered model.

check_data -> train -> evaluate -> register -> promote -> report. The run is skipped when
the training data's fingerprint equals the one production was trained on (or the one the
last rejected candidate was trained on with the same config): retraining would rebuild a
model the registry already has. A candidate is evaluated against production on the fixed
eval set and suites and promoted only when every gate passes. With no production yet
(the first run) there is no baseline: the perplexity-regression gate cannot apply, the
absolute gates (suite scores, safety) still do, and a passing candidate is promoted.

Every stage persists the run's state (`lmctl.retrain.state`; on a team server an MLflow
run, `lmctl.retrain.server_state`, so another host can go on), so a killed run resumes at
the stage it died in. Registering is idempotent: a version whose `lmctl.manifest_sha256`
tag matches the candidate checkpoint is reused, never duplicated.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from lmctl import atomic, checkpoint, registry
from lmctl.clock import utc_now
from lmctl.config import LmctlConfig, config_dump
from lmctl.errors import BadInputError, BusyError, ConfigError, LmctlError, PolicyError
from lmctl.evaluate.compare import Gate
from lmctl.retrain.state import (Outcome, RetrainState, StageRecord, begin_stage, end_stage, new_run_id,
                                 open_store, run_lock)

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


class _Ctx:
    """The validated inputs of one invocation (checked before any lock or state is written)."""

    def __init__(self, cfg: LmctlConfig, config_path: Path | None, force: bool) -> None:
        from lmctl.evaluate.suites import load_suite

        r = cfg.retrain
        if not cfg.registry.name:
            raise ConfigError("retrain needs registry.name", hint="set registry.name in the config")
        if cfg.data.train is None or not cfg.data.train.is_file():
            raise BadInputError(f"data.train {cfg.data.train}: not a file", hint="point data.train at the training data")
        self.eval_data = r.eval_data or cfg.data.validation
        if self.eval_data is None or not self.eval_data.is_file():
            raise BadInputError(f"retrain eval data {self.eval_data}: not a file",
                                hint="set retrain.eval_data (or data.validation) to a fixed eval set")
        for key, path in (("drift_current", r.drift_current), ("drift_reference", r.drift_reference)):
            if path is not None and not path.is_file():
                raise BadInputError(f"retrain.{key} {path}: not a file")
        suite_names = {load_suite(p).name for p in r.suites}
        unknown = set(r.min_scores) - suite_names
        if unknown:
            raise ConfigError(f"retrain.min_scores names suites not in retrain.suites: {', '.join(sorted(unknown))}")
        self.name = registry.validate_name(cfg.registry.name)
        registry.validate_alias(r.candidate_alias)
        registry.validate_alias(r.production_alias)
        self.cfg, self.config_path, self.force = cfg, config_path, force
        self.store = open_store(self.name, r.state_dir)


def retrain(cfg: LmctlConfig, config_path: Path | None = None, force: bool = False) -> RetrainResult:
    """Run (or resume) one retraining; the result says promoted, not_promoted or skipped.

    The webhook hears of every outcome but "busy" (a scheduler overlapping itself is not news),
    including invalid input and bugs: a cron job has nobody watching its stderr."""
    webhook = (cfg.retrain.webhook_url or os.environ.get(WEBHOOK_ENV) or None, cfg.retrain.webhook_timeout_s)
    started = time.perf_counter()
    state: RetrainState | None = None
    try:
        with registry.server_errors():
            ctx = _Ctx(cfg, config_path, force)
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
            "stage": state.stage if state else None, "exit_code": getattr(exc, "exit_code", 1),
            "error": str(exc) if isinstance(exc, LmctlError) else f"internal error: {type(exc).__name__}: {exc}",
        })
        raise
    _notify(*webhook, result.model_dump(mode="json"))
    return result


def _run_stages(ctx: _Ctx, state: RetrainState, started: float, lost_lock: Callable[[], bool]) -> RetrainResult:
    steps = {"check_data": _check_data, "train": _train, "evaluate": _evaluate, "register": _register,
             "promote": _promote}
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


def _collect(ctx: _Ctx) -> None:
    """retrain.keep_versions: registry gc after the run; its failure never changes the run's result."""
    from lmctl.registry.gc import gc

    try:
        done = gc(ctx.name, int(ctx.cfg.retrain.keep_versions or 0), yes=True)
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
    from lmctl.retrain.state import lock_holder

    registry.validate_name(name)
    with registry.server_errors():
        store = open_store(name, state_dir)
        run = store.unfinished(fetch=False) or store.latest()
        holder = lock_holder(name)
    where = str(store.root) if registry.embedded() else f"{registry.tracking_uri()} experiment lmctl-retrain/{name}"
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


def _production(ctx: _Ctx) -> str | None:
    return registry.alias_holder(ctx.name, ctx.cfg.retrain.production_alias)


def _config_sha(cfg: LmctlConfig) -> str:
    """What was trained, minus where: output paths and the retrain section do not change a model."""
    dumped = config_dump(cfg)
    dumped.pop("retrain", None)
    dumped.pop("output", None)
    return checkpoint.sha256_json(dumped)


def _check_data(ctx: _Ctx, state: RetrainState) -> tuple[str, str | None]:
    from lmctl.train.inputs import train_fingerprint

    cfg = ctx.cfg
    # the fingerprint `lmctl train` writes into the checkpoint and register tags the version
    # with, taken the same way: the rows are checked and tokenized once, into the cache entry
    # the training stage then reads (an unchanged file is a cache hit, not a second read)
    state.data_fingerprint = train_fingerprint(cfg).sha256
    state.config_sha256 = _config_sha(cfg)
    state.production_before = _production(ctx)
    reason = None if state.force else _skip_reason(ctx, state) or _no_drift_reason(ctx, state)
    if reason:
        state.result, state.reason, state.production_after = "skipped", reason, state.production_before
        log.info("skipped: %s", reason)
        return "report", reason
    return "train", f"data {state.data_fingerprint[:12]}"


def _skip_reason(ctx: _Ctx, state: RetrainState) -> str | None:
    fp = state.data_fingerprint or ""
    if state.production_before is not None:
        tags = registry.get_version(ctx.name, state.production_before).tags
        if tags.get("lmctl.data_fingerprint") == fp:
            return f"data unchanged: production v{state.production_before} was trained on data {fp[:12]} (--force retrains)"
    last = ctx.store.last_finished()
    if last and last.result == "not_promoted" and last.data_fingerprint == fp and last.config_sha256 == state.config_sha256:
        return (f"data and config unchanged since run {last.run_id}, whose candidate v{last.candidate_version} "
                "was not promoted (--force retrains)")
    return None


def _no_drift_reason(ctx: _Ctx, state: RetrainState) -> str | None:
    """With retrain.drift_current set: skip unless production's inputs drifted from the reference.
    The first run (no production) has no model to measure drift with, so it goes on."""
    from lmctl.monitor.drift import detect_drift, failed_checks

    r, cfg = ctx.cfg.retrain, ctx.cfg
    if r.drift_current is None or state.production_before is None:
        return None
    reference = r.drift_reference or cfg.data.train
    assert reference is not None  # data.train is checked by _Ctx
    path = ctx.store.run_dir(state.run_id) / "drift.json"
    report = detect_drift(f"models:/{ctx.name}/{state.production_before}", reference, r.drift_current, cfg.drift,
                          text_field=cfg.data.text_field, report=path)
    failed = [c.name for c in failed_checks(report)]
    state.drift = {"detected": bool(failed), "failed_checks": failed, "report": str(path),
                   "current": str(r.drift_current), "reference": str(reference)}
    if failed:
        log.info("drift detected (%s): retraining", ", ".join(failed))
        return None
    return f"no drift: {r.drift_current.name} matches {reference.name} on every check (--force retrains)"


def _train(ctx: _Ctx, state: RetrainState) -> tuple[str, str | None]:
    from lmctl.train import TrainResult, train

    cfg = ctx.cfg.model_copy(deep=True)
    # A run directory per retrain run: `--resume auto` then continues this run's own
    # checkpoints after a kill, and never mistakes an earlier run's final step for progress.
    cfg.output.run_name = f"{cfg.output.run_name or 'run'}-retrain-{state.run_id}"
    with ctx.store.sync_training(state, Path(cfg.output.dir) / str(cfg.output.run_name)):
        result = train(cfg, resume="auto")
    assert isinstance(result, TrainResult)  # not a dry run
    ckpt = Path(result.checkpoint)
    manifest = checkpoint.read_manifest(ckpt)
    # the data read by training is what the version will be tagged with; keep the state truthful
    state.data_fingerprint = manifest.data.train.sha256 if manifest.data.train else state.data_fingerprint
    state.checkpoint, state.train_run_dir = str(ckpt), result.run_dir
    state.training = {"steps": result.steps, "train_loss": result.train_loss, "eval_loss": result.eval_loss,
                      "resumed_from": result.resumed_from, "seconds": result.seconds}
    ctx.store.upload_checkpoint(state)  # team mode: any host can go on from here
    return "evaluate", f"{result.steps} steps"


def _evaluate(ctx: _Ctx, state: RetrainState) -> tuple[str, str | None]:
    from lmctl.evaluate import EvalGates, EvalOptions, evaluate

    r = ctx.cfg.retrain
    # pin production by version: the comparison must stay valid even if the alias moves meanwhile
    state.baseline_version = _production(ctx)
    baseline = f"models:/{ctx.name}/{state.baseline_version}" if state.baseline_version else None
    state.eval_report = str(ctx.store.run_dir(state.run_id) / "eval.json")
    report = evaluate(
        str(state.checkpoint), ctx.eval_data,
        EvalOptions(text_field=ctx.cfg.data.text_field, report=Path(state.eval_report), baseline=baseline,
                    suites=list(r.suites)),
        EvalGates(max_ppl_regression=r.max_ppl_regression if baseline else None, min_scores=r.min_scores,
                  max_safety_violations=r.max_safety_violations),
    )
    state.gates = report.gates
    state.evaluation = {"perplexity": report.perplexity, "baseline": baseline,
                        "baseline_perplexity": report.baseline.perplexity if report.baseline else None,
                        "regression_pct": report.comparison.regression_pct if report.comparison else None,
                        "suites": {s.name: s.score for s in report.suites}}
    failed = sum(not g.passed for g in report.gates)
    return "register", f"{len(report.gates) - failed}/{len(report.gates)} gates passed"


def _register(ctx: _Ctx, state: RetrainState) -> tuple[str, str | None]:
    from lmctl.registry.register import register

    ckpt = Path(str(state.checkpoint))
    state.manifest_sha256 = checkpoint.sha256_file(ckpt / checkpoint.MANIFEST)
    ctx.store.save(state)  # the intent: a resumed run looks for exactly this checkpoint in the registry
    existing = _registered(ctx.name, state.manifest_sha256)
    if existing is not None:
        log.info("candidate checkpoint already registered as %s v%s; not registering again", ctx.name, existing)
        version = existing
    else:
        version = register(ckpt, ctx.name, eval_report=Path(str(state.eval_report))).version
    state.candidate_version = version
    _ensure_alias(ctx.name, ctx.cfg.retrain.candidate_alias, version, f"retrain {state.run_id}: candidate")
    return "promote", f"v{version}"


def _registered(name: str, manifest_sha: str) -> str | None:
    """The version whose lock names this very checkpoint manifest, if any."""
    # only a finished registration counts; a killed one (FAILED) is cleaned up by the next register
    matches = [v.version for v in registry.list_versions(name)
               if v.usable and v.tags.get("lmctl.manifest_sha256") == manifest_sha]
    return min(matches, key=int) if matches else None


def _ensure_alias(name: str, alias: str, version: str, reason: str) -> None:
    """Move `alias` unless it already points at `version` (a resumed run must not log the move twice)."""
    if registry.alias_holder(name, alias) != version:
        registry.move_alias(name, alias, version, reason=reason, action="promote")


def _promote(ctx: _Ctx, state: RetrainState) -> tuple[str, str | None]:
    """Promote through the same policy as `lmctl promote --eval`: the eval report must be about
    this version, compared against the current holder, with every gate passed; the alias moves
    only if its holder is still the one compared against (checked under the registry lock)."""
    from lmctl.evaluate.compare import describe_failures
    from lmctl.registry.promotion import promote

    alias = ctx.cfg.retrain.production_alias
    version = str(state.candidate_version)
    if not all(g.passed for g in state.gates):
        state.result, state.reason = "not_promoted", "gate(s) failed: " + describe_failures(state.gates)
    elif _production(ctx) == version:  # a run killed right after moving the alias
        state.result, state.reason = "promoted", _promoted_reason(state)
    else:
        try:
            promote(ctx.name, version, alias, report_path=Path(str(state.eval_report)),
                    reason=f"retrain {state.run_id}: {_promoted_reason(state)}")
            state.result, state.reason = "promoted", _promoted_reason(state)
        except PolicyError as exc:  # e.g. production moved while this run evaluated
            state.result, state.reason = "not_promoted", exc.message.splitlines()[0]
    state.production_after = _production(ctx)
    log.info("%s: %s", state.result.replace("_", " "), state.reason)
    return "report", state.result


def _promoted_reason(state: RetrainState) -> str:
    if state.baseline_version is None:
        return "first production version (no baseline to compare against)"
    return f"all {len(state.gates)} gates passed against v{state.baseline_version}"


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

