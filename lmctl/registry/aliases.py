"""Alias moves (promote, rollback, set at register), each appended to the audit trail, and rollback.

A move is checked (a usable version, a valid alias) and made under the alias lock
(lmctl.registry.locks); its audit record is written RUNNING before the move and FINISHED
after it (lmctl.registry.audit).
"""

from __future__ import annotations

from lmctl import tracking, versions
from lmctl.config import PRODUCTION_ALIAS
from lmctl.errors import BadInputError, ModelRefError, PolicyError
from lmctl.registry import audit
from lmctl.registry.audit import Action, AliasMove
from lmctl.registry.locks import alias_lock


def move_alias(name: str, alias: str, version: str, reason: str | None = None, action: Action = "promote", *,
               report: dict[str, str] | None = None, forced: bool = False, check_previous: bool = False,
               expected_previous: str | None = None) -> AliasMove:
    """Point `alias` at `version` and append the move to the model's audit trail.

    With `check_previous`, the move happens only if the alias still points at
    `expected_previous` (None: no holder) once the lock is held, so a gate checked
    against one holder is never applied over another (PolicyError otherwise)."""
    versions.validate_alias(alias)
    versions.require_usable(versions.get_version(name, version))
    with tracking.server_errors():
        mlflow_client = tracking.client()
        audit_id = audit.prepare(mlflow_client, name)
        with alias_lock(mlflow_client, name):
            previous = versions.alias_holder(name, alias)
            if check_previous and previous != expected_previous:
                raise PolicyError(f"alias {alias!r} of {name!r} moved to v{previous} meanwhile (checked against "
                                  f"v{expected_previous}); run the promotion again")
            move = audit.new_record(name, alias, str(version), previous, action,
                                    reason=reason, report=report, forced=forced)
            with audit.Append(mlflow_client, audit_id, move) as move:
                mlflow_client.set_registered_model_alias(name, alias, str(version))
    return move


def alias_history(name: str, alias: str | None = None, limit: int | None = None) -> list[AliasMove]:
    """The model's audit trail, oldest first (all of it; with `limit`, the newest `limit` records)."""
    from mlflow.exceptions import MlflowException

    if limit is not None and limit < 1:
        raise BadInputError(f"--limit {limit}: must be at least 1")
    try:
        with tracking.server_errors():
            return audit.read(tracking.client(), versions.validate_name(name), alias, limit)
    except MlflowException:
        raise ModelRefError(f"registry has no model {name!r}") from None


def rollback_target(moves: list[AliasMove], holder: str | None) -> tuple[str | None, str | None]:
    """(version to roll back to, version rolled back from) from an alias's full record.

    Promotions push, rollbacks pop, so repeated rollbacks walk back through the history
    instead of toggling between two versions. The replay never trusts the record to be
    complete (a move made outside lmctl, a gc'd version): a rollback whose target is not
    what the stack says re-anchors the stack there, and the alias's actual holder is on top."""
    stack: list[str] = []
    for move in moves:
        if move.action == "rollback":
            if stack:
                stack.pop()
            if not stack or stack[-1] != move.version:
                stack.append(move.version)
        elif move.action == "promote":
            stack.append(move.version)
    if holder is not None and (not stack or stack[-1] != holder):
        stack.append(holder)  # moved outside lmctl: the live holder is what a rollback leaves
    return (stack[-2], stack[-1]) if len(stack) >= 2 else (None, holder)


def rollback(name: str, alias: str = PRODUCTION_ALIAS) -> AliasMove:
    """Move `alias` back to the version it held before its latest promotion still in effect."""
    versions.validate_alias(alias)
    holder = versions.alias_holder(name, alias)
    target, current = rollback_target(alias_history(name, alias), holder)
    if target is None:
        raise BadInputError(f"alias {alias!r} of {name!r} has no earlier version to roll back to")
    return move_alias(name, alias, target, reason=f"rollback from v{current}", action="rollback",
                      check_previous=True, expected_previous=holder)

