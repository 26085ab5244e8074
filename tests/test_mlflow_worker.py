"""lmctl.train.mlflow_worker: the training run's MLflow process, spoken to as MlflowRun speaks to
it, against a real sqlite MLflow store under tmp_path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmctl import tracking


def _worker() -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "lmctl.train.mlflow_worker"], text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)


def _open(worker: subprocess.Popen[str], uri: str) -> dict:
    request = {"tracking_uri": uri, "run_name": "w", "params": [["train.lr", "0.001"]],
               "inputs": [{"context": "train", "path": "/data/t.jsonl", "sha256": "ab" * 32, "rows": 3, "format": "text"}]}
    worker.stdin.write(json.dumps({"open": request}) + "\n")
    worker.stdin.flush()
    return json.loads(worker.stdout.readline())


def test_a_trainer_that_dies_leaves_its_run_killed_not_running(tmp_path: Path) -> None:
    uri = tracking.tracking_uri()
    worker = _worker()
    run_id = _open(worker, uri)["run_id"]
    worker.stdin.write(json.dumps({"metrics": [["loss", 2.5, 1, 1], ["loss", 2.0, 2, 2]]}) + "\n")
    worker.stdin.close()  # what a SIGKILLed trainer leaves: end of input, no "finish"
    assert worker.wait(timeout=60) == 0
    run = tracking.client(uri).get_run(run_id)
    assert run.info.status == "KILLED"
    assert run.data.params == {"train.lr": "0.001"} and run.data.metrics == {"loss": 2.0}
    assert run.inputs.dataset_inputs[0].dataset.digest == ("ab" * 32)[:32]


def test_a_failure_goes_back_as_the_error_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lmctl.errors import UnavailableError
    from lmctl.train.callbacks import raise_described

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    worker = _worker()
    reply = _open(worker, "http://127.0.0.1:9")  # nothing listens on the discard port
    worker.stdin.close()
    assert worker.wait(timeout=60) == 1
    assert reply["error"]["type"] == "UnavailableError" and reply["error"]["exit_code"] == 5
    with pytest.raises(UnavailableError, match="the tracking server http://127.0.0.1:9 is unavailable"):
        raise_described(reply["error"])


def test_in_a_process_that_has_mlflow_the_same_protocol_runs_in_a_thread(tmp_path: Path) -> None:
    import mlflow.tracking  # noqa: F401 - as in a retrain scheduler or a test session

    from lmctl.train import mlflow_worker

    uri = tracking.tracking_uri()
    worker = mlflow_worker.spawn(uri)
    assert isinstance(worker, mlflow_worker.InProcess)
    run_id = _open(worker, uri)["run_id"]
    worker.stdin.write(json.dumps({"metrics": [["loss", 1.5, 1, 1]]}) + "\n")
    worker.stdin.write(json.dumps({"finish": {"status": "FINISHED", "history": [{"step": 1, "loss": 1.5}],
                                              "run_dir": str(tmp_path)}}) + "\n")
    worker.stdin.flush()
    assert json.loads(worker.stdout.readline()) == {"done": True}
    mlflow_worker.stop(worker)
    run = tracking.client(uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics == {"loss": 1.5}
    assert (tmp_path / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
