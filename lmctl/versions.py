"""Registered versions as lmctl reads them, and a version made local as a verified checkpoint.

A registered version's artifacts are the whole checkpoint directory (adapter, tokenizer
files, lmctl.json); its tags carry the lock (manifest hash, tokenizer and data
fingerprints, base model) so `models:/` references are verified after download.

`lmctl register` creates a version tagged `lmctl.status=pending` (with the registering
process's pid, host and start time) and sets `ready` only when its artifacts, tags and
model card are complete. A pending version whose process is gone is FAILED: listed as not
usable, never resolved by `models:/` references or promoted, and removed by the next
`lmctl register`. Versions without the tag predate it and count as ready.

This is the read side every stage shares (MODEL_REF resolution, serving's hot reload,
retrain); the registry stage (lmctl.registry) builds registering, alias moves, the audit
trail and gc on top of it.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from lmctl import atomic, checkpoint, tracking
from lmctl.clock import utc_stamp
from lmctl.errors import BadInputError, BusyError, IntegrityError, ModelRefError
from lmctl.home import cache_dir

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
ALIAS_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
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
        return _to_version(tracking.client().get_model_version(validate_name(name), str(version)))
    except MlflowException:
        raise ModelRefError(f"registry has no version {version} of model {name!r}") from None


def alias_holder(name: str, alias: str) -> str | None:
    """The version `alias` points at, or None when the alias (or the model) does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return str(tracking.client().get_model_version_by_alias(validate_name(name), alias).version)
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
    mlflow_client = tracking.client()
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
            download_artifacts(artifact_uri=info.source, dst_path=str(stage), tracking_uri=tracking.tracking_uri())
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



def attach_eval(name: str, version: str, directory: Path, metrics: dict[str, float]) -> str:
    """Attach an eval report to the version's MLflow run and its metrics to the version's tags."""
    info = get_version(name, version)
    if not info.run_id:
        raise BadInputError(f"models:/{name}/{version} has no MLflow run to attach the report to")
    mlflow_client = tracking.client()
    artifact_path = f"eval/{utc_stamp()}"
    mlflow_client.log_artifacts(info.run_id, str(directory), artifact_path)
    with tracking.registry_lock():
        for key, value in metrics.items():
            mlflow_client.set_model_version_tag(name, version, f"eval.{key}", f"{value:.6g}")
    shutil.rmtree(directory, ignore_errors=True)
    return artifact_path
