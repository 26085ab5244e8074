"""The MLflow side of a training run, in a process of its own: `python -m lmctl.train.mlflow_worker`.

Importing MLflow and opening its store take 5-6 s of Python work (sqlalchemy, alembic's schema
check), and a thread cannot overlap that with the trainer's own imports and weight loading: both
need the GIL. A second process can, on a second core, so `lmctl train` no longer pays those
seconds before its first step. It also outlives a killed trainer by a moment: when the trainer
dies without saying "finish" (SIGKILL, OOM), the worker reads end-of-file and marks the run
KILLED instead of leaving it RUNNING forever.

`spawn` starts it when `train` starts, so it imports MLflow and opens the store while the trainer
loads. The protocol is JSON lines, written by lmctl.train.callbacks.MlflowRun on its stdin:
`{"open": {...}}` first (reply `{"run_id": ...}` or `{"error": ...}`), then any number of
`{"metrics": [[key, value, timestamp_ms, step], ...]}` (no reply), then
`{"finish": {"status", "history", "run_dir"}}` (reply `{"done": true}` or `{"error": ...}`).
Replies go to a private copy of stdout; the real stdout is pointed at stderr, so nothing MLflow
prints can corrupt them. Hand-written because MLflow's own async logging still imports MLflow
and opens the store in the caller's process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO, Any, Union

EXPERIMENT = "lmctl-train"


def spawn(tracking_uri: str) -> Worker:
    """Start the worker first thing: it imports MLflow and opens the store at `tracking_uri`
    while the trainer imports torch and transformers, reads its data and loads the model. In a
    process that has imported MLflow already (a retrain scheduler, a test session) there is no
    import left to overlap, and the same `serve` runs in a thread instead (InProcess)."""
    if "mlflow.tracking" in sys.modules:
        return InProcess(tracking_uri)
    return subprocess.Popen([sys.executable, "-m", "lmctl.train.mlflow_worker", tracking_uri], text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)


class InProcess:
    """`serve` in a thread, over two pipes: what MlflowRun uses of a Popen (stdin, stdout, wait, kill)."""

    def __init__(self, tracking_uri: str) -> None:
        import threading

        requests_r, requests_w = os.pipe()
        replies_r, replies_w = os.pipe()
        self.stdin, self.stdout = os.fdopen(requests_w, "w"), os.fdopen(replies_r, "r")
        self.returncode: int | None = None

        def run() -> None:
            with os.fdopen(requests_r, "r") as requests, os.fdopen(replies_w, "w") as replies:
                prewarm(tracking_uri)
                self.returncode = serve(requests, replies)

        self._thread = threading.Thread(target=run, name="lmctl-mlflow", daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> int | None:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise subprocess.TimeoutExpired("lmctl-mlflow", timeout or 0)
        return self.returncode

    def kill(self) -> None:  # a thread cannot be killed; end of input ends it
        pass


Worker = Union["subprocess.Popen[str]", InProcess]  # what spawn returns


def stop(worker: Worker, timeout_s: float = 60.0) -> None:
    """End of input: the worker ends the run it opened as KILLED (none: it just exits)."""
    if worker.stdin is not None and not worker.stdin.closed:
        worker.stdin.close()
    try:
        worker.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()


def abandon(worker: Worker) -> None:
    """The run was refused before any MLflow run opened: end of input, without waiting. The
    worker finishes opening the store (never cut short halfway through creating it) and exits,
    while the refusal reaches the user at once."""
    if worker.stdin is not None and not worker.stdin.closed:
        worker.stdin.close()


def prewarm(tracking_uri: str) -> None:
    """Import MLflow and open its store before the trainer asks for a run. A failure here is
    met again, and reported, when the run opens."""
    try:
        import mlflow.entities  # noqa: F401

        from lmctl import tracking

        tracking.client(tracking_uri)
    except Exception:  # noqa: BLE001, S110 - open_run raises it with its exit code
        pass


def describe(exc: BaseException) -> dict[str, Any]:
    """An error as the trainer re-raises it (lmctl.train.callbacks.raise_described)."""
    from lmctl.errors import exit_code_of

    return {"type": type(exc).__name__, "message": getattr(exc, "message", None) or str(exc) or type(exc).__name__,
            "hint": getattr(exc, "hint", None), "exit_code": exit_code_of(exc)}


def open_run(request: dict[str, Any]) -> tuple[Any, str]:
    """Create the run, log the config as params and the data files as inputs: (client, run_id)."""
    from mlflow.entities import Param

    from lmctl import tracking

    with tracking.server_errors(request["tracking_uri"]):  # an unreachable team server is exit 5, not a bug
        client = tracking.client(request["tracking_uri"])
        experiment = tracking.experiment_id(client, EXPERIMENT)
        run_id = client.create_run(experiment, run_name=request["run_name"]).info.run_id
        client.log_batch(run_id, params=[Param(key, value) for key, value in request["params"]])
        log_data_inputs(client, run_id, request["inputs"])
    return client, run_id


def log_data_inputs(client: Any, run_id: str, inputs: list[dict[str, Any]]) -> None:
    """Record the training and validation files on the run, with their fingerprints."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    entries = []
    for data in inputs:
        dataset = Dataset(
            name=Path(data["path"]).name, digest=data["sha256"][:32], source_type="local",
            source=json.dumps({"uri": data["path"]}),
            profile=json.dumps({"num_rows": data["rows"], "format": data["format"], "sha256": data["sha256"]}),
        )
        entries.append(DatasetInput(dataset=dataset, tags=[InputTag(key="mlflow.data.context", value=data["context"])]))
    if entries:
        client.log_inputs(run_id, datasets=entries)


def save_loss_curve(history: list[dict[str, Any]], out: Path) -> Path | None:
    """Training and validation loss against step, as a PNG (None when nothing was logged).
    Drawn on a bare Agg Figure: pyplot's import (its backends and state) costs ~0.4 s for nothing."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if not train and not evals:
        return None
    fig = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for points, label in ((train, "train loss"), (evals, "validation loss")):
        if points:
            ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    return out


def finish_run(client: Any, run_id: str, request: dict[str, Any]) -> None:
    """Draw and log the loss curve, then end the run with the trainer's status."""
    history, run_dir = request.get("history") or [], request.get("run_dir")
    curve = save_loss_curve(history, Path(run_dir) / "loss_curve.png") if history and run_dir else None
    if curve is not None:
        client.log_artifact(run_id, str(curve))
    client.set_terminated(run_id, request["status"])


def log_metrics(client: Any, run_id: str, rows: list[list[Any]]) -> None:
    from mlflow.entities import Metric

    client.log_batch(run_id, metrics=[Metric(key=k, value=v, timestamp=t, step=s) for k, v, t, s in rows])


def _preload_plotting() -> None:
    import matplotlib.backends.backend_agg  # noqa: F401
    import matplotlib.figure  # noqa: F401


def serve(requests: IO[str], replies: IO[str]) -> int:
    """Answer the trainer's requests until "finish" or end-of-file (the trainer died: KILLED)."""
    def reply(message: dict[str, Any]) -> None:
        replies.write(json.dumps(message) + "\n")
        replies.flush()

    client, run_id, failed = None, "", None
    try:
        for line in requests:
            request = json.loads(line)
            if "open" in request:
                client, run_id = open_run(request["open"])
                reply({"run_id": run_id})
                _preload_plotting()  # while the trainer trains, so "finish" does not wait for the import
            elif "metrics" in request and failed is None:
                try:
                    log_metrics(client, run_id, request["metrics"])
                except Exception as exc:  # noqa: BLE001 - told to the trainer at finish; later metrics skipped
                    failed = exc
            elif "finish" in request:
                finish_run(client, run_id, request["finish"])
                if failed is not None:
                    raise failed
                reply({"done": True})
                return 0
    except Exception as exc:  # noqa: BLE001 - every failure goes back to the trainer, which raises it
        reply({"error": describe(exc)})
        return 1
    if client is not None:  # end of input without "finish": the trainer is gone
        client.set_terminated(run_id, "KILLED")
    return 0


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the trainer, which says "finish" KILLED
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # anything MLflow prints lands on stderr
    if len(sys.argv) > 1:
        prewarm(sys.argv[1])
    return serve(sys.stdin, replies)


if __name__ == "__main__":
    raise SystemExit(main())
