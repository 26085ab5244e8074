"""`lmctl promote`: an alias moves only when an eval report says the version earned it.

The policy, in order:
- `--force` skips it, but needs `--reason TEXT`; the move is recorded as forced.
- When the alias already has a holder, a report (`lmctl eval --report`, schema
  lmctl.eval/1) is required. It must be about the version being promoted, its baseline
  must be the alias's current holder, and it must hold at least one gate, all passed.
- When the alias has no holder yet (the first promotion), no report is needed; one that
  is given must still be about this version and pass its gates.

"About" means the report's registry reference (`models:/NAME/VERSION` as measured),
or, for a report on a local checkpoint, the sha256 of its lmctl.json matching the
version's `lmctl.manifest_sha256` tag. The report's path and sha256 go into the audit
history with the move, and the move only happens if the holder checked is still the
holder once the registry lock is held.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from lmctl import versions
from lmctl.config import PRODUCTION_ALIAS
from lmctl.registry.aliases import move_alias
from lmctl.errors import BadInputError, PolicyError
from lmctl.evaluate.compare import Gate, enforce_gates
from lmctl.evaluate.schema import LoadedReport, ModelIdentity, load_eval_report


class PromotionResult(BaseModel):
    name: str
    alias: str
    version: str
    previous_version: str | None
    gated: bool  # an eval report was checked against the policy
    why: str
    forced: bool
    reason: str | None
    report: dict[str, str] | None  # the gating report's path and sha256, as the history records them
    gates: list[Gate]
    at: str | None  # None when refused: nothing moved
    user: str | None
    promoted: bool = True  # False: the policy said no (exit 3); `why` says why, the alias did not move


def _is_version(identity: ModelIdentity, info: versions.RegisteredVersion) -> bool:
    """Whether a report's candidate or baseline identity names this registry version."""
    return identity.is_version(info.name, info.version, info.tags.get("lmctl.manifest_sha256"))


def check_report(loaded: LoadedReport, info: versions.RegisteredVersion, alias: str, holder: str | None) -> None:
    """Raise PolicyError (with the gate table) unless the report clears `info` for `alias`."""
    report, path = loaded.report, loaded.path
    if not _is_version(report.identity, info):
        raise PolicyError(f"report {path} is about {report.identity.describe()}, not models:/{info.name}/{info.version}")
    if holder is not None:
        current = versions.get_version(info.name, holder)
        if not report.baseline or not _is_version(report.baseline, current):
            raise PolicyError(
                f"report {path} compares against {report.baseline.describe() if report.baseline else 'no baseline'}, "
                f"but {alias!r} is held by models:/{info.name}/{holder}",
                hint=f"re-run the eval with --baseline models:/{info.name}@{alias}")
        if not report.gates:
            raise PolicyError(f"report {path} has no gates, so it cannot clear a promotion",
                              hint="re-run the eval with --max-ppl-regression PCT (and --min-score SUITE=X ...)")
    enforce_gates(report.gates, f"not promoted: {{n}} gate(s) failed in {path}")


def promote(name: str, version: str, alias: str = PRODUCTION_ALIAS, report_path: Path | None = None,
            force: bool = False, reason: str | None = None) -> PromotionResult:
    """Move `alias` to `version` if the promotion policy allows it (or `force` with a reason)."""
    versions.validate_name(name)
    versions.validate_alias(alias)
    if force and not (reason and reason.strip()):
        raise BadInputError("--force needs --reason TEXT: a forced promotion must say why")
    info = versions.require_usable(versions.get_version(name, version))
    loaded = load_eval_report(report_path) if report_path is not None else None
    holder = versions.alias_holder(name, alias)
    if holder == info.version:
        raise BadInputError(f"alias {alias!r} of {name!r} already points at version {holder}; nothing to promote")
    try:
        return _promote(info, alias, loaded, holder, force, reason)
    except PolicyError as exc:
        exc.result = PromotionResult(
            name=name, alias=alias, version=info.version, previous_version=holder, gated=loaded is not None,
            why=str(exc), forced=force, reason=reason, report=loaded.record() if loaded is not None else None,
            gates=loaded.report.gates if loaded is not None else [], at=None, user=None, promoted=False)
        raise


def _promote(info: versions.RegisteredVersion, alias: str, loaded: LoadedReport | None, holder: str | None,
             force: bool, reason: str | None) -> PromotionResult:
    """The policy decision and the move; PolicyError when the policy says no."""
    name, version = info.name, info.version
    gated = False
    if force:
        why = "forced past the promotion policy"
    elif loaded is None and holder is not None:
        raise PolicyError(
            f"promoting to {alias!r} (held by v{holder}) needs an eval report whose gates pass against it",
            hint=f"run `lmctl eval models:/{name}/{version} --data FILE --baseline models:/{name}@{alias} "
                 f"--max-ppl-regression PCT --report R`, then `lmctl promote {name} {version} --eval R`; "
                 "or use --force --reason TEXT")
    elif loaded is None:
        why = "first promotion"
    else:
        check_report(loaded, info, alias, holder)
        gated = True
        why = "first promotion; report gates passed" if holder is None else f"report gates passed against v{holder}"
    record = loaded.record() if loaded is not None else None
    move = move_alias(name, alias, info.version, reason=reason, report=record, forced=force,
                               check_previous=True, expected_previous=holder)
    return PromotionResult(
        name=name, alias=alias, version=move.version, previous_version=move.previous_version, gated=gated,
        why=why, forced=force, reason=reason, report=record,
        gates=loaded.report.gates if loaded is not None else [], at=move.at, user=move.user,
    )
