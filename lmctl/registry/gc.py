"""`lmctl registry gc NAME --keep N`: delete old versions and their artifacts, never a protected one.

Protected, whatever its age: the newest N versions (N = 0: none for its age alone, the
other protections still hold); a version an alias points at; one that
an alias pointed at (from or to) in the model's last K audit records; one an unfinished
retrain run uses (its candidate or baseline); and one still being registered. Without
`yes` nothing is deleted (the plan is the result). With it, the protections are checked
again under the alias lock, and each deletion is its own audit record (action `delete`),
written before and settled after, like an alias move. A deleted version's registration run
and its artifacts (checkpoint and model card) go with it, through MLflow's artifact
repository (a local directory or the server's proxied store alike), as does this host's
download cache of it.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from lmctl import tracking, versions
from lmctl.errors import BadInputError
from lmctl.home import cache_dir
from lmctl.registry import audit
from lmctl.registry.aliases import alias_history
from lmctl.registry.locks import alias_lock

log = logging.getLogger("lmctl.registry.gc")
InUse = Callable[[str], dict[str, str]]  # model name -> {version: why a later stage needs it}
RECENT_MOVES = 20  # default K: versions named by the last K audit records are kept for rollbacks


class KeptVersion(BaseModel):
    version: str
    why: str


class GcResult(BaseModel):
    name: str
    keep: int
    recent_moves: int
    dry_run: bool
    delete: list[str]  # the versions the plan deletes (deleted, unless dry_run)
    kept: list[KeptVersion]
    deleted: list[str]


def _protected(name: str, keep: int, recent_moves: int, in_use: InUse) -> tuple[list[str], dict[str, str]]:
    """(all versions, oldest first; why each protected one is kept)."""
    found = versions.list_versions(name)
    why: dict[str, str] = {}
    for v in found:
        if v.status == "PENDING":
            why[v.version] = "being registered"
    for record in alias_history(name, limit=recent_moves) if recent_moves else []:
        for version in (record.version, record.previous_version):
            if version and record.action != "delete":
                why.setdefault(version, f"named by the last {recent_moves} audit records")
    for version, use in in_use(name).items():
        why.setdefault(version, use)
    for v in found:
        if v.aliases:
            why[v.version] = "holds " + ", ".join(v.aliases)
    for v in found[len(found) - keep:] if keep else []:  # found[-0:] would be all of them
        why.setdefault(v.version, f"one of the newest {keep}")
    return [v.version for v in found], why


def _delete_artifacts(mlflow_client: Any, run_id: str | None, name: str, version: str) -> None:
    """The version's registration run and artifacts, unless another version still uses the run."""
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    shutil.rmtree(cache_dir() / "registry" / name / version, ignore_errors=True)
    if not run_id or mlflow_client.search_model_versions(f"run_id = '{run_id}'"):
        return
    with contextlib.suppress(MlflowException):
        run = mlflow_client.get_run(run_id)
        get_artifact_repository(run.info.artifact_uri).delete_artifacts()
        mlflow_client.delete_run(run_id)


def gc(name: str, keep: int, *, in_use: InUse, recent_moves: int = RECENT_MOVES, yes: bool = False) -> GcResult:
    """Delete the versions of `name` no protection keeps (with `yes`; else only the plan).
    `in_use(name)` names the versions a later stage still needs and why (retrain passes
    `lmctl.retrain.state.versions_in_use`: the registry cannot see retrain's run state)."""
    versions.validate_name(name)
    if keep < 0 or recent_moves < 0:
        raise BadInputError("--keep and --recent-moves must be at least 0")
    found, why = _protected(name, keep, recent_moves, in_use)
    plan = [v for v in found if v not in why]
    result = GcResult(name=name, keep=keep, recent_moves=recent_moves, dry_run=not yes, delete=plan,
                      kept=[KeptVersion(version=v, why=w) for v, w in sorted(why.items(), key=lambda i: int(i[0]))],
                      deleted=[])
    if not yes or not plan:
        return result
    mlflow_client = tracking.client()
    audit_id = audit.prepare(mlflow_client, name)
    with tracking.server_errors(), alias_lock(mlflow_client, name):
        _, why = _protected(name, keep, recent_moves, in_use)  # aliases may have moved since the plan
        for version in (v for v in plan if v not in why):
            run_id = mlflow_client.get_model_version(name, version).run_id
            record = audit.new_record(name, None, version, None, "delete", reason=f"registry gc --keep {keep}")
            with audit.Append(mlflow_client, audit_id, record):
                mlflow_client.delete_model_version(name, version)
            _delete_artifacts(mlflow_client, run_id, name, version)
            result.deleted.append(version)
            log.info("deleted models:/%s/%s", name, version)
    return result
