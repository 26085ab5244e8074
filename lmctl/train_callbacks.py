"""Trainer callbacks: MLflow metrics, a rich progress bar, and lmctl checkpoint export."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

log = logging.getLogger("lmctl.train")


class MlflowMetrics(TrainerCallback):
    """Log every Trainer log line (loss, lr, eval_loss, tokens/s) to one MLflow run."""

    def __init__(self, client: Any, run_id: str) -> None:
        self.client, self.run_id = client, run_id
        self.t0 = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))}
        elapsed = time.perf_counter() - self.t0
        if state.num_input_tokens_seen and elapsed > 0:
            values["tokens_per_s"] = state.num_input_tokens_seen / elapsed
        metrics = [Metric(key=k, value=v, timestamp=now, step=state.global_step) for k, v in values.items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)


class Progress(TrainerCallback):
    """A rich progress bar with loss and tokens/s on a terminal; one log line per eval otherwise."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.task: Any = None
        self.loss = float("nan")
        self.t0 = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if not sys.stderr.isatty():
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn

        self.bar = Bar(
            TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(), console=Console(stderr=True), transient=False,
        )
        self.bar.start()
        self.task = self.bar.add_task("train", total=state.max_steps, completed=state.global_step, info="")

    def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
        logs = logs or {}
        self.loss = float(logs.get("loss", self.loss))
        if "eval_loss" in logs:
            log.info("step %d: eval_loss %.4f", state.global_step, logs["eval_loss"])
        elif "loss" in logs and self.bar is None:  # no terminal: a log line instead of a bar
            log.info("step %d/%d: loss %.4f, %.0f tok/s", state.global_step, state.max_steps, self.loss, self._rate(state))

    def _rate(self, state) -> float:  # type: ignore[no-untyped-def]
        return state.num_input_tokens_seen / max(time.perf_counter() - self.t0, 1e-9)

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if self.bar is not None:
            info = f"loss {self.loss:.3f}  {self._rate(state):,.0f} tok/s"
            self.bar.update(self.task, completed=state.global_step, info=info)

    def on_train_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if self.bar is not None:
            self.bar.stop()


class ExportCheckpoints(TrainerCallback):
    """After each Trainer save, write a sealed lmctl checkpoint for that step."""

    def __init__(self, export: Callable[[Any, Any], Path]) -> None:
        self.export = export
        self.exported: list[Path] = []

    def on_save(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
        self.exported.append(self.export(model, state))
