"""The audit trail of a registered model: one MLflow run per record, append-only and unbounded.

Every alias move (promote, rollback, forced, retrain, set at register) and every version
that `lmctl registry gc` deletes is one run in the experiment `lmctl-audit/<name>`. MLflow
has no append-only log, and a registered-model tag (the old `lmctl.alias_history`, capped at
30 entries) is one editable blob. A run's params cannot be changed once logged, runs page
(`search_runs` with `page_token`) without limit, and the MLflow UI shows them as a table:
one row per move, named `production: v2 -> v3`, with time, user, host, CI job, alias, from,
to, reason, report sha256 and forced as columns.

Records are appended while the alias lock is held (`locks.alias_lock`: the local
registry lock and, on a team server, its server lock), so start times and `seq` strictly
increase. A record is written RUNNING before the move it describes and FINISHED after it:
a process killed in between leaves a RUNNING record, which the next append (under the same
lock, so the writer is gone) settles by checking the registry: the move happened
(FINISHED) or not (FAILED, never shown).

Histories written by older lmctl versions into the `lmctl.alias_history` tag are read as
well, and copied into runs (then the tag is removed) by the next move.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel

from lmctl.clock import utc_now

EXPERIMENT_PREFIX = "lmctl-audit/"
LEGACY_TAG = "lmctl.alias_history"  # the capped JSON history of lmctl before the audit trail
PAGE = 1000  # records per search_runs page
MAX_PARAM = 6000  # MLflow's limit on a param value
Action = Literal["promote", "rollback", "delete"]
# CI systems' job ids, in the order they are looked for; the label says which system it was.
CI_ENV = (("GITHUB_RUN_ID", "github"), ("CI_JOB_ID", "gitlab"), ("BUILDKITE_JOB_ID", "buildkite"),
          ("CIRCLE_WORKFLOW_JOB_ID", "circleci"), ("BUILD_TAG", "jenkins"), ("TF_BUILD_BUILDID", "azure"),
          ("BUILD_ID", "ci"))


class AliasMove(BaseModel):
    """One audit record: an alias move, or (action `delete`, alias None) a deleted version."""

    name: str
    alias: str | None
    version: str
    previous_version: str | None
    at: str
    user: str
    host: str | None = None
    ci_job: str | None = None
    reason: str | None = None
    action: Action = "promote"
    report: dict[str, str] | None = None  # eval report that gated the move: path, sha256
    forced: bool = False  # moved with --force, past the promotion gates
    seq: int | None = None  # position in the model's audit trail (1 = first); None for unmigrated entries


def user() -> str:
    """Who acts: LMCTL_USER, then USER/LOGNAME, else uid<N>@host (never 'unknown')."""
    for key in ("LMCTL_USER", "USER", "LOGNAME"):
        if os.environ.get(key):
            return os.environ[key]
    return f"uid{os.getuid()}@{socket.gethostname()}"  # a cron job or pod often has no USER


def ci_job() -> str | None:
    """The CI job this process runs in (`github:RUN_ID`, `gitlab:JOB_ID`, ...), if any."""
    for key, label in CI_ENV:
        if os.environ.get(key):
            return f"{label}:{os.environ[key]}"
    return None


def new_record(name: str, alias: str | None, version: str, previous: str | None, action: Action, *,
               reason: str | None = None, report: dict[str, str] | None = None, forced: bool = False) -> AliasMove:
    return AliasMove(name=name, alias=alias, version=str(version), previous_version=previous, at=utc_now(),
                     user=user(), host=socket.gethostname(), ci_job=ci_job(), reason=reason, action=action,
                     report=report, forced=forced)


def experiment_name(name: str) -> str:
    return EXPERIMENT_PREFIX + name


def _params(move: AliasMove) -> dict[str, str]:
    raw = {"seq": move.seq, "action": move.action, "alias": move.alias, "from": move.previous_version,
           "to": move.version, "at": move.at, "user": move.user, "host": move.host, "ci_job": move.ci_job,
           "reason": move.reason, "forced": str(move.forced).lower(),
           "report_path": move.report.get("path") if move.report else None,
           "report_sha256": move.report.get("sha256") if move.report else None}
    return {k: str(v)[:MAX_PARAM] for k, v in raw.items() if v is not None}


def _from_run(name: str, run: Any) -> AliasMove:
    p = run.data.params
    report = {"path": p.get("report_path", ""), "sha256": p["report_sha256"]} if "report_sha256" in p else None
    return AliasMove(name=name, alias=p.get("alias"), version=p["to"], previous_version=p.get("from"), at=p["at"],
                     user=p["user"], host=p.get("host"), ci_job=p.get("ci_job"), reason=p.get("reason"),
                     action=p["action"], report=report, forced=p.get("forced") == "true", seq=int(p["seq"]))


def _run_name(move: AliasMove) -> str:
    if move.action == "delete":
        return f"deleted v{move.version}"
    before = f"v{move.previous_version}" if move.previous_version else "none"
    return f"{move.alias}: {before} -> v{move.version}" + (" (rollback)" if move.action == "rollback" else "")


def _experiment_id(mlflow_client: Any, name: str) -> str | None:
    exp = mlflow_client.get_experiment_by_name(experiment_name(name))
    return exp.experiment_id if exp is not None else None


def prepare(mlflow_client: Any, name: str) -> str:
    """The model's audit experiment, created if needed: call before taking the registry lock
    (creating an experiment takes it too)."""
    from lmctl import tracking

    return tracking.experiment_id(mlflow_client, experiment_name(name))


def _runs(mlflow_client: Any, exp_id: str, alias: str | None, newest_first: bool, limit: int | None) -> Iterator[Any]:
    """The record runs, page by page (search_runs page_token), in start-time order."""
    where = f"params.alias = '{alias}'" if alias else ""
    order = [f"attributes.start_time {'DESC' if newest_first else 'ASC'}"]
    token, seen = None, 0
    while limit is None or seen < limit:
        size = PAGE if limit is None else min(PAGE, limit - seen)
        page = mlflow_client.search_runs([exp_id], where, max_results=size, order_by=order, page_token=token)
        yield from page
        seen += len(page)
        token = page.token
        if not token or not page:
            return


def _legacy(mlflow_client: Any, name: str) -> list[dict[str, Any]]:
    raw = (mlflow_client.get_registered_model(name).tags or {}).get(LEGACY_TAG)
    return json.loads(raw) if raw else []


def _entry_sha(entry: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(entry, sort_keys=True).encode()).hexdigest()


def _happened(mlflow_client: Any, move: AliasMove) -> bool:
    """Whether the move of a RUNNING record (its writer was killed) reached the registry."""
    from mlflow.exceptions import MlflowException

    try:
        if move.action == "delete":
            mlflow_client.get_model_version(move.name, move.version)
            return False
        return str(mlflow_client.get_model_version_by_alias(move.name, move.alias).version) == move.version
    except MlflowException as exc:
        if exc.get_http_status_code() >= 500:  # the server failed: no answer either way
            raise
        return move.action == "delete"


def read(mlflow_client: Any, name: str, alias: str | None = None, limit: int | None = None) -> list[AliasMove]:
    """The model's records, oldest first; with `limit`, only the newest `limit` of them."""
    legacy = _legacy(mlflow_client, name)  # raises MlflowException for an unknown model
    exp_id = _experiment_id(mlflow_client, name)
    runs = list(_runs(mlflow_client, exp_id, alias, newest_first=limit is not None,
                      limit=None if legacy else limit)) if exp_id else []
    if limit is not None and not legacy:
        runs.reverse()
    migrated = {r.data.tags.get("lmctl.audit.legacy_sha256") for r in runs}
    moves = [AliasMove(**{"name": name, **e}) for e in legacy
             if _entry_sha(e) not in migrated and (alias is None or e.get("alias") == alias)]
    newest = runs[-1].info.run_id if runs else None
    for run in runs:
        move = _from_run(name, run)
        # a RUNNING record is the newest one of a killed writer: shown if its move happened
        if run.info.status == "FINISHED" or (
                run.info.status == "RUNNING" and run.info.run_id == newest and _happened(mlflow_client, move)):
            moves.append(move)
    moves.sort(key=lambda m: (m.seq is not None, m.seq or 0))  # legacy entries predate every run
    return moves[-limit:] if limit is not None else moves


def _last_run(mlflow_client: Any, exp_id: str) -> Any | None:
    page = mlflow_client.search_runs([exp_id], "", max_results=1, order_by=["attributes.start_time DESC"])
    return page[0] if page else None


def _settle(mlflow_client: Any, name: str, last: Any | None) -> None:
    """Finish or fail the record a killed writer left RUNNING (only the newest can be)."""
    if last is not None and last.info.status == "RUNNING":
        happened = _happened(mlflow_client, _from_run(name, last))
        mlflow_client.set_terminated(last.info.run_id, "FINISHED" if happened else "FAILED")


def _write(mlflow_client: Any, exp_id: str, move: AliasMove, start_ms: int, tags: dict[str, str]) -> str:
    from mlflow.entities import Param

    run = mlflow_client.create_run(exp_id, start_time=start_ms, run_name=_run_name(move),
                                   tags={"lmctl.audit.action": move.action, **tags})
    mlflow_client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in _params(move).items()])
    return run.info.run_id


def _migrate(mlflow_client: Any, name: str, exp_id: str, seq: int, start_ms: int) -> tuple[int, int]:
    """Copy the legacy tag's entries into records (once each, even after a kill), then drop the tag."""
    legacy = _legacy(mlflow_client, name)
    if not legacy:
        return seq, start_ms
    done = {r.data.tags.get("lmctl.audit.legacy_sha256") for r in _runs(mlflow_client, exp_id, None, False, None)}
    for entry in legacy:
        sha = _entry_sha(entry)
        if sha in done:
            continue
        seq, start_ms = seq + 1, start_ms + 1
        move = AliasMove(**{"name": name, **entry}).model_copy(update={"seq": seq})
        run_id = _write(mlflow_client, exp_id, move, start_ms, {"lmctl.audit.legacy_sha256": sha})
        mlflow_client.set_terminated(run_id, "FINISHED", end_time=start_ms)
    mlflow_client.delete_registered_model_tag(name, LEGACY_TAG)
    return seq, start_ms


class Append:
    """Write one record around the change it describes; the caller holds the alias mutex.

        exp_id = audit.prepare(client, name)       # before the lock
        with lock, audit.Append(client, exp_id, move) as move:  # RUNNING; predecessor settled, legacy migrated
            client.set_registered_model_alias(...)
        # record FINISHED; an exception marks it FAILED
    """

    def __init__(self, mlflow_client: Any, exp_id: str, move: AliasMove) -> None:
        self.client, self.exp_id, self.move, self.run_id = mlflow_client, exp_id, move, ""

    def __enter__(self) -> AliasMove:
        exp_id = self.exp_id
        last = _last_run(self.client, exp_id)
        _settle(self.client, self.move.name, last)
        seq = int(last.data.params.get("seq", 0)) if last else 0
        start_ms = last.info.start_time if last else 0
        seq, start_ms = _migrate(self.client, self.move.name, exp_id, seq, start_ms)
        # strictly after the previous record even if clocks differ between hosts
        start_ms = max(int(time.time() * 1000), start_ms + 1)
        self.move = self.move.model_copy(update={"seq": seq + 1})
        self.run_id = _write(self.client, exp_id, self.move, start_ms, {})
        return self.move

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if exc_type else "FINISHED")
