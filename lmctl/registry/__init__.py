"""The model registry: MLflow, embedded (sqlite under LMCTL_HOME) or a team server.

A registered version's artifacts are the whole checkpoint directory (adapter, tokenizer
files, lmctl.json); its tags carry the lock (manifest hash, tokenizer and data
fingerprints, base model) so `models:/` references are verified after download.
MLflow alias moves are last-writer-wins and a fresh sqlite database races on creation,
so lmctl serializes its own registry writes with a file lock.

`lmctl register` creates a version tagged `lmctl.status=pending` (with the registering
process's pid, host and start time) and sets `ready` only when its artifacts, tags and
model card are complete. A pending version whose process is gone is FAILED: listed as not
usable, never resolved by `models:/` references or promoted, and removed by the next
`lmctl register`. Versions without the tag predate it and count as ready.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from lmctl import atomic, checkpoint
from lmctl.clock import utc_stamp
from lmctl.errors import BadInputError, BusyError, IntegrityError, ModelRefError, PolicyError, UnavailableError
from lmctl.home import cache_dir, lmctl_home
from lmctl.registry.audit import Action, AliasMove

log = logging.getLogger("lmctl.registry")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
ALIAS_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
LOCK_TIMEOUT_S = 120.0
_SCHEMA_READY: set[str] = set()  # tracking URIs whose schema this process already created or checked
STATUS_TAG = "lmctl.status"  # pending while `lmctl register` works on a version, ready once complete
STALE_AFTER_S = 6 * 3600  # a pending version registered from another host counts as failed after this


# READY, or lmctl's view of an unfinished registration: PENDING (its process is alive) or FAILED
# (killed); MLflow's own PENDING_/FAILED_REGISTRATION pass through as MLflow reports them.
VersionStatus = Literal["READY", "PENDING", "FAILED", "PENDING_REGISTRATION", "FAILED_REGISTRATION"]


class RegisteredVersion(BaseModel):
    name: str
    version: str
    aliases: list[str]
    source: str
    run_id: str | None
    status: VersionStatus
    usable: bool = True
    created_at: str
    model_card: str | None = None  # runs:/RUN_ID/README.md, generated at register
    tags: dict[str, str]


def tracking_uri(configured: str | None = None) -> str:
    """Config, then MLFLOW_TRACKING_URI, then sqlite under LMCTL_HOME, always absolute."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
        return uri
    return "sqlite:///" + str(lmctl_home() / "mlflow.db")


def embedded() -> bool:
    """True for the embedded sqlite store under one LMCTL_HOME; False for a team server."""
    return tracking_uri().startswith("sqlite:")


def registry_lock():  # type: ignore[no-untyped-def]
    """Serializes lmctl's registry writes on this machine (LMCTL_HOME). On a team server, version
    numbers are assigned by the server's database, model creation tolerates a lost race
    (`ensure_registered_model`), and alias moves also take a lock in the server's database
    (`alias_lock`), so those are safe across machines too."""
    from filelock import FileLock

    return FileLock(str(lmctl_home() / "registry.lock"), timeout=LOCK_TIMEOUT_S)


@contextlib.contextmanager
def alias_lock(mlflow_client, name: str) -> Iterator[None]:  # type: ignore[no-untyped-def]
    """Held while the aliases of `name` move or its versions are deleted: the local registry
    lock, and on a team server a lock in the server's database (lmctl.registry.mutex), so
    alias moves and their audit records are serialized across machines too."""
    with registry_lock():
        if embedded():
            yield
            return
        from lmctl.registry.mutex import PREFIX, server_lock

        with server_lock(mlflow_client, PREFIX + name, wait_s=LOCK_TIMEOUT_S,
                         what=f"the alias lock of {name!r} is taken", hint="try again"):
            yield


@contextlib.contextmanager
def server_errors() -> Iterator[None]:
    """Turn a tracking server that is unreachable or answers 5xx into UnavailableError (exit 5).
    MLflow retries first (MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT)."""
    from mlflow.exceptions import MlflowException
    from requests.exceptions import RequestException

    try:
        yield
    except (MlflowException, RequestException) as exc:
        status = exc.get_http_status_code() if isinstance(exc, MlflowException) else 503
        if embedded() or status < 500:
            raise
        detail = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise UnavailableError(f"the tracking server {tracking_uri()} is unavailable: {detail}",
                               hint="nothing half-written is trusted; run the command again once it is back") from None


def client(configured_uri: str | None = None):  # type: ignore[no-untyped-def]
    """An MlflowClient on the resolved URI; the sqlite schema is created once, under a lock."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # Against an HTTP server MLflow writes "View run at <url>" to stdout when a run ends,
    # which would break `--json` (stdout carries exactly the result).
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    from filelock import Timeout
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(configured_uri)
    if uri in _SCHEMA_READY:  # one command calls client() several times; the schema check is once
        return MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        with registry_lock():
            mlflow_client = MlflowClient(tracking_uri=uri, registry_uri=uri)
            mlflow_client.search_experiments(max_results=1)  # forces schema creation/migration now
    except Timeout:
        raise BusyError("the registry is locked by another lmctl process; try again") from None
    _SCHEMA_READY.add(uri)
    return mlflow_client


def experiment_id(mlflow_client, name: str) -> str:  # type: ignore[no-untyped-def]
    """Get or create an experiment; embedded stores keep artifacts under LMCTL_HOME."""
    exp = mlflow_client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    from mlflow.exceptions import MlflowException

    location = (lmctl_home() / "mlartifacts").as_uri() if embedded() else None
    with registry_lock():
        exp = mlflow_client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return mlflow_client.create_experiment(name, artifact_location=location)
        except MlflowException as exc:  # another machine created it first (the local lock does not reach it)
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        return mlflow_client.get_experiment_by_name(name).experiment_id


def ensure_registered_model(mlflow_client, name: str, description: str) -> None:  # type: ignore[no-untyped-def]
    """Create the registered model unless it exists. On a team server the local lock does not
    reach other machines, so two first registers may race: the loser's "already exists" is fine.
    A model whose description is still lmctl's old placeholder gets `description`; one a person
    wrote is left alone."""
    from mlflow.exceptions import MlflowException

    from lmctl.registry.model_card import OLD_MODEL_DESCRIPTION

    existing = mlflow_client.search_registered_models(f"name='{name}'")
    if existing:
        if (existing[0].description or "").strip() in ("", OLD_MODEL_DESCRIPTION):
            mlflow_client.update_registered_model(name, description=description)
        return
    try:
        mlflow_client.create_registered_model(name, description=description)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def validate_name(name: str) -> str:
    if not NAME_RE.match(name) or ".." in name:
        raise BadInputError(f"invalid model name {name!r}", hint="use letters, digits, '_', '-', '.'; at most 100 characters")
    return name


def validate_alias(alias: str) -> str:
    if not ALIAS_RE.match(alias) or re.fullmatch(r"v\d+", alias):
        raise BadInputError(f"invalid alias {alias!r}", hint="start with a letter; letters, digits, '_', '-'; not v<digits>")
    return alias


def _process_start(pid: int) -> str | None:
    """Start time of a process (Linux /proc), so a reused pid is not mistaken for the original."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def registrar_tags() -> dict[str, str]:
    """Who is registering: lets a later command tell a live registration from a killed one."""
    pid = os.getpid()
    return {"lmctl.register_pid": str(pid), "lmctl.register_host": socket.gethostname(),
            "lmctl.register_start": _process_start(pid) or "", "lmctl.register_at": f"{time.time():.0f}"}


def registrar_gone(tags: dict[str, str]) -> bool:
    """True when the process named by `registrar_tags` is certainly not running any more."""
    age = time.time() - float(tags.get("lmctl.register_at") or 0)
    pid = int(tags.get("lmctl.register_pid") or 0)
    if tags.get("lmctl.register_host") != socket.gethostname() or pid <= 0:
        return age > STALE_AFTER_S  # another machine's process cannot be asked
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, owned by someone else
    start = tags.get("lmctl.register_start")
    return bool(start) and _process_start(pid) not in (None, start)


def _to_version(mv: Any) -> RegisteredVersion:
    created = datetime.fromtimestamp(mv.creation_timestamp / 1000, tz=timezone.utc).isoformat()
    tags = dict(mv.tags or {})
    status: VersionStatus = str(mv.status)  # type: ignore[assignment]  # MLflow's ModelVersionStatus names
    if tags.get(STATUS_TAG, "ready") != "ready":
        status = "FAILED" if registrar_gone(tags) else "PENDING"
    return RegisteredVersion(
        name=mv.name, version=str(mv.version), aliases=list(mv.aliases or []), source=mv.source,
        run_id=mv.run_id, status=status, usable=status == "READY", created_at=created,
        model_card=tags.get("lmctl.model_card"), tags=tags,
    )


def require_usable(info: RegisteredVersion) -> RegisteredVersion:
    """Refuse a version whose registration is unfinished (exit 5) or was killed (exit 4)."""
    ref = f"models:/{info.name}/{info.version}"
    if info.status == "PENDING":
        raise BusyError(f"{ref} is still being registered (pid {info.tags.get('lmctl.register_pid')}); try again")
    if not info.usable:
        raise IntegrityError(f"{ref} is {info.status}: its registration did not finish",
                             hint="the next `lmctl register` removes it; use another version")
    return info


def get_version(name: str, version: str) -> RegisteredVersion:
    from mlflow.exceptions import MlflowException

    try:
        return _to_version(client().get_model_version(validate_name(name), str(version)))
    except MlflowException:
        raise ModelRefError(f"registry has no version {version} of model {name!r}") from None


def alias_holder(name: str, alias: str) -> str | None:
    """The version `alias` points at, or None when the alias (or the model) does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client().get_model_version_by_alias(validate_name(name), alias).version)
    except MlflowException as exc:
        if exc.get_http_status_code() >= 500:  # the server failed: "no holder" would be a lie
            raise
        return None


def version_for_alias(name: str, alias: str) -> str:
    """Like `alias_holder`, for references that must resolve (ModelRefError otherwise)."""
    version = alias_holder(name, alias)
    if version is None:
        raise ModelRefError(f"registry has no alias {alias!r} on model {name!r}")
    return version


def list_versions(name: str | None = None) -> list[RegisteredVersion]:
    mlflow_client = client()
    query = f"name='{validate_name(name)}'" if name else None
    versions = [_to_version(mv) for mv in mlflow_client.search_model_versions(query)]
    # search_model_versions leaves aliases out; the registered model carries them.
    aliases: dict[tuple[str, str], list[str]] = {}
    for model in mlflow_client.search_registered_models(query):
        for alias, version in (model.aliases or {}).items():
            aliases.setdefault((model.name, str(version)), []).append(alias)
    for v in versions:
        v.aliases = sorted(aliases.get((v.name, v.version), []))
    return sorted(versions, key=lambda v: (v.name, int(v.version)))


def download_version(name: str, version: str) -> Path:
    """Materialize a version's checkpoint in the local cache and verify it against its lock."""
    from mlflow.artifacts import download_artifacts

    info = require_usable(get_version(name, version))
    target = cache_dir() / "registry" / name / str(version)
    if not checkpoint.is_checkpoint(target):
        with atomic.staging_dir(target) as stage:
            download_artifacts(artifact_uri=info.source, dst_path=str(stage), tracking_uri=tracking_uri())
            inner = next((p.parent for p in stage.rglob(checkpoint.MANIFEST)), None)
            if inner is None:
                raise IntegrityError(f"models:/{name}/{version}: artifacts hold no {checkpoint.MANIFEST}")
            if inner != stage:
                for item in inner.iterdir():
                    shutil.move(str(item), stage / item.name)
                shutil.rmtree(inner)
    checkpoint.verify(target)
    expected = info.tags.get("lmctl.manifest_sha256")
    actual = checkpoint.sha256_file(target / checkpoint.MANIFEST)
    if expected and expected != actual:
        raise IntegrityError(f"models:/{name}/{version}: lmctl.json sha256 {actual[:16]}… differs from the registry's {expected[:16]}…")
    return target


def move_alias(name: str, alias: str, version: str, reason: str | None = None, action: Action = "promote", *,
               report: dict[str, str] | None = None, forced: bool = False, check_previous: bool = False,
               expected_previous: str | None = None) -> AliasMove:
    """Point `alias` at `version` and append the move to the model's audit trail.

    With `check_previous`, the move happens only if the alias still points at
    `expected_previous` (None: no holder) once the lock is held, so a gate checked
    against one holder is never applied over another (PolicyError otherwise)."""
    from lmctl.registry import audit

    validate_alias(alias)
    require_usable(get_version(name, version))
    with server_errors():
        mlflow_client = client()
        audit_id = audit.prepare(mlflow_client, name)
        with alias_lock(mlflow_client, name):
            previous = alias_holder(name, alias)
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

    from lmctl.registry import audit

    if limit is not None and limit < 1:
        raise BadInputError(f"--limit {limit}: must be at least 1")
    try:
        with server_errors():
            return audit.read(client(), validate_name(name), alias, limit)
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


def rollback(name: str, alias: str = "production") -> AliasMove:
    """Move `alias` back to the version it held before its latest promotion still in effect."""
    validate_alias(alias)
    holder = alias_holder(name, alias)
    target, current = rollback_target(alias_history(name, alias), holder)
    if target is None:
        raise BadInputError(f"alias {alias!r} of {name!r} has no earlier version to roll back to")
    return move_alias(name, alias, target, reason=f"rollback from v{current}", action="rollback",
                      check_previous=True, expected_previous=holder)


def attach_eval(name: str, version: str, directory: Path, metrics: dict[str, float]) -> str:
    """Attach an eval report to the version's MLflow run and its metrics to the version's tags."""
    import shutil

    info = get_version(name, version)
    if not info.run_id:
        raise BadInputError(f"models:/{name}/{version} has no MLflow run to attach the report to")
    mlflow_client = client()
    artifact_path = f"eval/{utc_stamp()}"
    mlflow_client.log_artifacts(info.run_id, str(directory), artifact_path)
    with registry_lock():
        for key, value in metrics.items():
            mlflow_client.set_model_version_tag(name, version, f"eval.{key}", f"{value:.6g}")
    shutil.rmtree(directory, ignore_errors=True)
    return artifact_path
