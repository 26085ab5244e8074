"""Where lmctl's MLflow lives and the one way to reach it: the tracking URI, the client, locks.

Every stage that talks to MLflow (training runs, registered versions, the audit trail,
retrain state on a team server) gets its client here, so the URI rules, the telemetry
switch, the sqlite schema creation and the mapping of an unreachable server to exit 5 are
written once. The embedded default is sqlite under LMCTL_HOME; `MLFLOW_TRACKING_URI` or the
config's `registry.tracking_uri` points at a team `mlflow server`. MLflow alias moves are
last-writer-wins and a fresh sqlite database races on creation, so lmctl serializes its own
registry writes on a machine with a file lock (`registry_lock`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from lmctl.errors import BusyError, UnavailableError
from lmctl.home import lmctl_home

LOCK_TIMEOUT_S = 120.0
_SCHEMA_READY: set[str] = set()  # tracking URIs whose schema this process already created or checked


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
def server_errors(uri: str | None = None) -> Iterator[None]:
    """Turn a tracking server that is unreachable or answers 5xx into UnavailableError (exit 5).
    MLflow retries first (MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT).
    `uri`: the server talked to, when not this process's `tracking_uri()`."""
    from mlflow.exceptions import MlflowException
    from requests.exceptions import RequestException

    try:
        yield
    except (MlflowException, RequestException) as exc:
        status = exc.get_http_status_code() if isinstance(exc, MlflowException) else 503
        uri = uri or tracking_uri()
        if uri.startswith("sqlite:") or status < 500:
            raise
        detail = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise UnavailableError(f"the tracking server {uri} is unavailable: {detail}",
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


