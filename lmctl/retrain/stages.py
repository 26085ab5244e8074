"""The stages of a retrain run after its inputs are checked: each takes the context and the run's
state, records what it did in the state, and returns the next stage and a note.

check_data (skip on unchanged data or no drift) -> train -> evaluate (against production) ->
register (idempotent by the checkpoint's manifest hash) -> promote (through the promotion policy).
"""

from __future__ import annotations

import logging
from pathlib import Path

from lmctl import checkpoint, versions
from lmctl.config import LmctlConfig, config_dump
from lmctl.errors import PolicyError
from lmctl.registry import move_alias
from lmctl.retrain.context import RetrainContext
from lmctl.retrain.state import RetrainState

log = logging.getLogger("lmctl.retrain")
StageResult = tuple[str, str | None]  # (next stage, note)


def _production(ctx: RetrainContext) -> str | None:
    return versions.alias_holder(ctx.name, ctx.cfg.retrain.production_alias)


def _config_sha(cfg: LmctlConfig) -> str:
    """What was trained, minus where: output paths and the retrain section do not change a model."""
    dumped = config_dump(cfg)
    dumped.pop("retrain", None)
    dumped.pop("output", None)
    return checkpoint.sha256_json(dumped)


def check_data(ctx: RetrainContext, state: RetrainState) -> StageResult:
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


def _skip_reason(ctx: RetrainContext, state: RetrainState) -> str | None:
    fp = state.data_fingerprint or ""
    if state.production_before is not None:
        tags = versions.get_version(ctx.name, state.production_before).tags
        if tags.get("lmctl.data_fingerprint") == fp:
            return f"data unchanged: production v{state.production_before} was trained on data {fp[:12]} (--force retrains)"
    last = ctx.store.last_finished()
    if last and last.result == "not_promoted" and last.data_fingerprint == fp and last.config_sha256 == state.config_sha256:
        return (f"data and config unchanged since run {last.run_id}, whose candidate v{last.candidate_version} "
                "was not promoted (--force retrains)")
    return None


def _no_drift_reason(ctx: RetrainContext, state: RetrainState) -> str | None:
    """With retrain.drift_current set: skip unless production's inputs drifted from the reference.
    The first run (no production) has no model to measure drift with, so it goes on."""
    from lmctl.monitor.drift import detect_drift, failed_checks

    r, cfg = ctx.cfg.retrain, ctx.cfg
    if r.drift_current is None or state.production_before is None:
        return None
    reference = r.drift_reference or cfg.data.train
    assert reference is not None  # data.train is checked by RetrainContext
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


def train(ctx: RetrainContext, state: RetrainState) -> StageResult:
    from lmctl.train import TrainResult
    from lmctl.train import train as run_training

    cfg = ctx.cfg.model_copy(deep=True)
    # A run directory per retrain run: `--resume auto` then continues this run's own
    # checkpoints after a kill, and never mistakes an earlier run's final step for progress.
    cfg.output.run_name = f"{cfg.output.run_name or 'run'}-retrain-{state.run_id}"
    with ctx.store.sync_training(state, Path(cfg.output.dir) / str(cfg.output.run_name)):
        result = run_training(cfg, resume="auto")
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


def evaluate(ctx: RetrainContext, state: RetrainState) -> StageResult:
    from lmctl.evaluate import EvalGates, EvalOptions
    from lmctl.evaluate import evaluate as run_eval

    r = ctx.cfg.retrain
    # pin production by version: the comparison must stay valid even if the alias moves meanwhile
    state.baseline_version = _production(ctx)
    baseline = f"models:/{ctx.name}/{state.baseline_version}" if state.baseline_version else None
    state.eval_report = str(ctx.store.run_dir(state.run_id) / "eval.json")
    report = run_eval(
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


def register(ctx: RetrainContext, state: RetrainState) -> StageResult:
    from lmctl.registry.register import register as register_version

    ckpt = Path(str(state.checkpoint))
    state.manifest_sha256 = checkpoint.sha256_file(ckpt / checkpoint.MANIFEST)
    ctx.store.save(state)  # the intent: a resumed run looks for exactly this checkpoint in the registry
    existing = _registered(ctx.name, state.manifest_sha256)
    if existing is not None:
        log.info("candidate checkpoint already registered as %s v%s; not registering again", ctx.name, existing)
        version = existing
    else:
        version = register_version(ckpt, ctx.name, eval_report=Path(str(state.eval_report)),
                           parent_alias=ctx.cfg.retrain.production_alias).version
    state.candidate_version = version
    _ensure_alias(ctx.name, ctx.cfg.retrain.candidate_alias, version, f"retrain {state.run_id}: candidate")
    return "promote", f"v{version}"


def _registered(name: str, manifest_sha: str) -> str | None:
    """The version whose lock names this very checkpoint manifest, if any."""
    # only a finished registration counts; a killed one (FAILED) is cleaned up by the next register
    matches = [v.version for v in versions.list_versions(name)
               if v.usable and v.tags.get("lmctl.manifest_sha256") == manifest_sha]
    return min(matches, key=int) if matches else None


def _ensure_alias(name: str, alias: str, version: str, reason: str) -> None:
    """Move `alias` unless it already points at `version` (a resumed run must not log the move twice)."""
    if versions.alias_holder(name, alias) != version:
        move_alias(name, alias, version, reason=reason, action="promote")


def promote(ctx: RetrainContext, state: RetrainState) -> StageResult:
    """Promote through the same policy as `lmctl promote --eval`: the eval report must be about
    this version, compared against the current holder, with every gate passed; the alias moves
    only if its holder is still the one compared against (checked under the registry lock)."""
    from lmctl.evaluate.compare import describe_failures
    from lmctl.registry.promotion import promote as promote_version

    alias = ctx.cfg.retrain.production_alias
    version = str(state.candidate_version)
    if not all(g.passed for g in state.gates):
        state.result, state.reason = "not_promoted", "gate(s) failed: " + describe_failures(state.gates)
    elif _production(ctx) == version:  # a run killed right after moving the alias
        state.result, state.reason = "promoted", _promoted_reason(state)
    else:
        try:
            promote_version(ctx.name, version, alias, report_path=Path(str(state.eval_report)),
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
