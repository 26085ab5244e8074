"""Retrain run states on a team server: one MLflow run per retrain run, so any host resumes it.

In team mode (the tracking URI is a server) a CronJob pod killed and rescheduled on
another node has a fresh disk: the state in `LMCTL_HOME` is gone with the old one. So the
state lives in the experiment `lmctl-retrain/<name>`: one MLflow run per retrain run
(named by its run id), RUNNING until the retrain run is done, tagged with its stage,
result, host and versions, with `state.json` and the run's reports (eval.json,
drift.json, report.json) as artifacts, uploaded at every save. While training, the newest
checkpoint (the Trainer's resumable state and the sealed lmctl checkpoint) is uploaded as it
is written (`training/`), so a run killed mid-training continues on another host from the
last sealed checkpoint; after training, the sealed candidate is uploaded (`checkpoint/`), so
a run resumed on another host evaluates and registers exactly that checkpoint. Both are
deleted from the run once it is done (the registered version holds its own copy).

The local `state_dir` keeps working copies (a resumed run downloads into it), written
with the same atomic writes as the embedded store's (`RunStore`).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmctl import checkpoint
from lmctl import tracking
from lmctl.retrain.state import RetrainState, RunStore

log = logging.getLogger("lmctl.retrain")
EXPERIMENT_PREFIX = "lmctl-retrain/"
STAGE_TAG, RESULT_TAG = "lmctl.retrain.stage", "lmctl.retrain.result"
CHECKPOINT_DIR = "checkpoint"
TRAINING_DIR = "training"  # the newest checkpoint while training: trainer/checkpoint-N + checkpoints/step-N


class ServerRunStore:
    """The runs of one registered model, as MLflow runs on the tracking server."""

    def __init__(self, name: str, local_root: Path) -> None:
        self.name, self.local = name, RunStore(local_root)
        self.client = tracking.client()
        self.experiment_id = tracking.experiment_id(self.client, EXPERIMENT_PREFIX + name)
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
            for path in (CHECKPOINT_DIR, TRAINING_DIR):
                with contextlib.suppress(Exception):  # best effort: the version has its own copy
                    self._repo(run_id, path).delete_artifacts()
            self.client.set_terminated(run_id, "FINISHED")

    @contextlib.contextmanager
    def sync_training(self, state: RetrainState, run_dir: Path) -> Iterator[None]:
        """Around training: when this host has no checkpoint of the run yet, fetch the newest
        one another host uploaded (so `--resume auto` continues from it); meanwhile upload
        each checkpoint as training seals it."""
        from lmctl.train import complete_trainer_checkpoints

        run_id = self._mlflow_id(state)
        if not complete_trainer_checkpoints(run_dir):
            self._fetch_training(run_id, run_dir)
        uploader = _TrainingUploader(self.client, run_id, run_dir)
        uploader.start()
        try:
            yield
        finally:
            uploader.stopped.set()
            uploader.join(timeout=60)

    def _fetch_training(self, run_id: str, run_dir: Path) -> None:
        """The newest fully uploaded pair (its sealed lmctl.json is uploaded last) into run_dir."""
        from mlflow.artifacts import download_artifacts

        sealed = [i.path for i in self.client.list_artifacts(run_id, f"{TRAINING_DIR}/checkpoints") if i.is_dir]
        complete = sorted(p for p in sealed if any(f.path.endswith(checkpoint.MANIFEST)
                                                   for f in self.client.list_artifacts(run_id, p)))
        if not complete:
            return
        step = int(complete[-1].rsplit("step-", 1)[1])
        log.info("fetching the run's training checkpoint at step %d from the server", step)
        pair = ((f"{TRAINING_DIR}/trainer/checkpoint-{step}", run_dir / "trainer" / f"checkpoint-{step}"),
                (complete[-1], run_dir / "checkpoints" / f"step-{step:06d}"))  # sealed last: it marks the pair complete
        with tempfile.TemporaryDirectory(dir=run_dir.parent if run_dir.parent.is_dir() else None) as tmp:
            for path, local in pair:
                fetched = download_artifacts(run_id=run_id, artifact_path=path, dst_path=tmp,
                                             tracking_uri=tracking.tracking_uri())
                local.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(fetched, local)

    def upload_checkpoint(self, state: RetrainState) -> None:
        """The sealed candidate, so another host can go on from it."""
        self.client.log_artifacts(self._mlflow_id(state), str(state.checkpoint), CHECKPOINT_DIR)

    def _repo(self, run_id: str, path: str) -> Any:
        return _repository(f"{self.client.get_run(run_id).info.artifact_uri}/{path}")

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
                                   tracking_uri=tracking.tracking_uri())
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
                with tempfile.TemporaryDirectory(dir=target.parent if target.parent.is_dir() else None) as tmp:
                    fetched = download_artifacts(run_id=run.info.run_id, artifact_path=CHECKPOINT_DIR, dst_path=tmp,
                                                 tracking_uri=tracking.tracking_uri())
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(fetched, target)
            state.checkpoint = str(target)
        self.local.save(state)
        return state

    def _download_state(self, run: Any) -> RetrainState:
        from mlflow.artifacts import download_artifacts

        with tempfile.TemporaryDirectory() as tmp:
            path = download_artifacts(run_id=run.info.run_id, artifact_path="state.json", dst_path=tmp,
                                      tracking_uri=tracking.tracking_uri())
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


class _TrainingUploader(threading.Thread):
    """Uploads the newest complete checkpoint pair of a training run (the Trainer's resumable
    state, then the sealed checkpoint with its lmctl.json last, so a half-upload never looks
    sealed) and then drops the pair it replaces. A failed upload only warns: training goes on,
    and a resume elsewhere starts from the previous pair."""

    def __init__(self, client: Any, run_id: str, run_dir: Path, every_s: float = 2.0) -> None:
        super().__init__(name="lmctl-checkpoint-upload", daemon=True)
        self.client, self.run_id, self.run_dir, self.every_s = client, run_id, run_dir, every_s
        self.stopped = threading.Event()
        self.uploaded: str | None = None

    def run(self) -> None:
        from lmctl.train import complete_trainer_checkpoints

        while not self.stopped.wait(self.every_s):
            complete = complete_trainer_checkpoints(self.run_dir)
            if complete and complete[0].name != self.uploaded:
                try:
                    self._upload(complete[0])
                except Exception as exc:  # noqa: BLE001 - the server or disk hiccuped: training goes on
                    log.warning("warning: training checkpoint not uploaded (%s)", str(exc).splitlines()[0][:200])

    def _upload(self, trainer_ckpt: Path) -> None:
        step = int(trainer_ckpt.name.removeprefix("checkpoint-"))
        sealed = self.run_dir / "checkpoints" / f"step-{step:06d}"
        self.client.log_artifacts(self.run_id, str(trainer_ckpt), f"{TRAINING_DIR}/trainer/{trainer_ckpt.name}")
        target = f"{TRAINING_DIR}/checkpoints/{sealed.name}"
        for item in sorted(sealed.iterdir()):
            if item.name != checkpoint.MANIFEST:
                if item.is_dir():
                    self.client.log_artifacts(self.run_id, str(item), f"{target}/{item.name}")
                else:
                    self.client.log_artifact(self.run_id, str(item), target)
        self.client.log_artifact(self.run_id, str(sealed / checkpoint.MANIFEST), target)
        previous, self.uploaded = self.uploaded, trainer_ckpt.name
        if previous:
            old = int(previous.removeprefix("checkpoint-"))
            uri = self.client.get_run(self.run_id).info.artifact_uri
            for path in (f"{TRAINING_DIR}/trainer/{previous}", f"{TRAINING_DIR}/checkpoints/step-{old:06d}"):
                with contextlib.suppress(Exception):
                    _repository(f"{uri}/{path}").delete_artifacts()


def _repository(uri: str) -> Any:
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    return get_artifact_repository(uri)
