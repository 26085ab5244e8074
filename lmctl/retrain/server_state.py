"""Retrain run states on a team server: one MLflow run per retrain run, so any host resumes it.

In team mode (the tracking URI is a server) a CronJob pod killed and rescheduled on
another node has a fresh disk: the state in `LMCTL_HOME` is gone with the old one. So the
state lives in the experiment `lmctl-retrain/<name>`: one MLflow run per retrain run
(named by its run id), RUNNING until the retrain run is done, tagged with its stage,
result, host and versions, with `state.json` and the run's reports (eval.json,
drift.json, report.json) as artifacts, uploaded at every save. After training, the sealed
candidate checkpoint is uploaded too (`checkpoint/`), so a run resumed on another host
evaluates and registers exactly that checkpoint; it is deleted from the run once the run
is done (the registered version holds its own copy).

The local `state_dir` keeps working copies (a resumed run downloads into it), written
with the same atomic writes as the embedded store's (`RunStore`).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import tempfile
from pathlib import Path
from typing import Any

from lmctl import checkpoint, registry
from lmctl.retrain.state import RetrainState, RunStore

log = logging.getLogger("lmctl.retrain")
EXPERIMENT_PREFIX = "lmctl-retrain/"
STAGE_TAG, RESULT_TAG = "lmctl.retrain.stage", "lmctl.retrain.result"
CHECKPOINT_DIR = "checkpoint"


class ServerRunStore:
    """The runs of one registered model, as MLflow runs on the tracking server."""

    def __init__(self, name: str, local_root: Path) -> None:
        self.name, self.local = name, RunStore(local_root)
        self.client = registry.client()
        self.experiment_id = registry.experiment_id(self.client, EXPERIMENT_PREFIX + name)
        self._ids: dict[str, str] = {}  # lmctl run id -> MLflow run id

    def run_dir(self, run_id: str) -> Path:
        return self.local.run_dir(run_id)

    def _mlflow_id(self, state: RetrainState) -> str:
        if state.run_id not in self._ids:
            found = self._search(f"attributes.run_name = '{state.run_id}'", 1)
            run = found[0] if found else self.client.create_run(self.experiment_id, run_name=state.run_id)
            self._ids[state.run_id] = run.info.run_id
        return self._ids[state.run_id]

    def save(self, state: RetrainState) -> None:
        from mlflow.entities import RunTag

        self.local.save(state)
        run_id = self._mlflow_id(state)
        tags = {STAGE_TAG: state.stage, RESULT_TAG: state.result or "", "lmctl.retrain.host": socket.gethostname(),
                "lmctl.retrain.candidate_version": state.candidate_version or "",
                "lmctl.retrain.baseline_version": state.baseline_version or ""}
        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        self.client.log_artifacts(run_id, str(self.run_dir(state.run_id)))  # state.json and the reports
        if state.stage == "done":
            with contextlib.suppress(Exception):  # best effort: the version has its own copy
                self._repo(run_id, CHECKPOINT_DIR).delete_artifacts()
            self.client.set_terminated(run_id, "FINISHED")

    def upload_checkpoint(self, state: RetrainState) -> None:
        """The sealed candidate, so another host can go on from it."""
        self.client.log_artifacts(self._mlflow_id(state), str(state.checkpoint), CHECKPOINT_DIR)

    def _repo(self, run_id: str, path: str) -> Any:
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        return get_artifact_repository(f"{self.client.get_run(run_id).info.artifact_uri}/{path}")

    def _search(self, where: str, limit: int) -> list[Any]:
        return list(self.client.search_runs([self.experiment_id], where, max_results=limit,
                                            order_by=["attributes.start_time DESC"]))

    def _fetch(self, run: Any, with_checkpoint: bool) -> RetrainState:
        """The run's state and reports into the local run directory, paths made local."""
        from mlflow.artifacts import download_artifacts

        state = self._download_state(run)
        self._ids[state.run_id] = run.info.run_id
        local = self.run_dir(state.run_id)
        for item in self.client.list_artifacts(run.info.run_id):
            if not item.is_dir and item.path != "state.json":
                download_artifacts(run_id=run.info.run_id, artifact_path=item.path, dst_path=str(local),
                                   tracking_uri=registry.tracking_uri())
        # another host's paths: the same files, downloaded here
        for field in ("eval_report", "report"):
            if getattr(state, field):
                setattr(state, field, str(local / Path(str(getattr(state, field))).name))
        if state.drift and state.drift.get("report"):
            state.drift["report"] = str(local / Path(str(state.drift["report"])).name)
        if with_checkpoint and state.checkpoint and not checkpoint.is_checkpoint(Path(state.checkpoint)):
            target = self.local.root / "checkpoints" / state.run_id
            if not checkpoint.is_checkpoint(target):
                log.info("fetching the candidate checkpoint of run %s from the server", state.run_id)
                download_artifacts(run_id=run.info.run_id, artifact_path=CHECKPOINT_DIR, dst_path=str(target.parent),
                                   tracking_uri=registry.tracking_uri())
                (target.parent / CHECKPOINT_DIR).rename(target)
            state.checkpoint = str(target)
        self.local.save(state)
        return state

    def _download_state(self, run: Any) -> RetrainState:
        from mlflow.artifacts import download_artifacts

        with tempfile.TemporaryDirectory() as tmp:
            path = download_artifacts(run_id=run.info.run_id, artifact_path="state.json", dst_path=tmp,
                                      tracking_uri=registry.tracking_uri())
            return RetrainState.model_validate_json(Path(path).read_text(encoding="utf-8"))

    def unfinished(self, fetch: bool = True) -> RetrainState | None:
        """The newest run not `done`, on any host: the one to resume (with `fetch`, its files
        and checkpoint are downloaded here and its paths made local)."""
        runs = self._search(f"tags.`{STAGE_TAG}` != 'done'", 1)
        if not runs:
            return None
        return self._fetch(runs[0], with_checkpoint=True) if fetch else self._download_state(runs[0])

    def last_finished(self) -> RetrainState | None:
        runs = self._search(f"tags.`{STAGE_TAG}` = 'done' and tags.`{RESULT_TAG}` != 'skipped'", 1)
        return self._download_state(runs[0]) if runs else None

    def latest(self) -> RetrainState | None:
        runs = self._search("", 1)
        return self._download_state(runs[0]) if runs else None

    def prune(self, keep: int) -> None:
        """Local working copies only: the server keeps every run's record."""
        self.local.prune(keep)
