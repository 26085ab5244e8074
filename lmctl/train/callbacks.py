"""Training-time side channels: the MLflow run, a rich progress bar, sealing checkpoints, and the
run's real tokens and steady-state throughput, counted on the host."""

from __future__ import annotations

import logging
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from lmctl.checkpoint import ManifestData
from lmctl.config import LmctlConfig, config_dump
from lmctl.distributed import World

log = logging.getLogger("lmctl.train")
EXPERIMENT = "lmctl-train"


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
        if not sys.stderr.isatty() or not state.is_world_process_zero:  # under torchrun one bar, rank 0's
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
        if not state.is_world_process_zero:  # under DDP one process reports
            return
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


def _synced_now(sync: bool) -> float:
    if sync:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return time.perf_counter()


class Throughput(TrainerCallback):
    """Real tokens and throughput, counted on the host, never syncing the device.

    The training collator hands each batch's real tokens (rows before padding) to `collated`;
    each trained micro-batch (`on_substep_end`, `on_step_end`) takes the oldest, so batches
    the DataLoader fetched ahead are counted once trained, and eval batches (collated between
    a step that evaluates and `on_evaluate`) not at all. This replaces the Trainer's
    `include_num_input_tokens_seen`, which syncs the device with `.item()` every micro-batch.

    Steady state: the steps after the first `warmup` ones, over the time from the end of
    step `warmup` (one step, up to 10 in long runs) to the end of training, less the time spent
    evaluating and saving. The last
    step always logs, so the final train loss is reported however short the run.
    """

    def __init__(self) -> None:
        self.pending: deque[int] = deque()
        self.collecting = True
        self.tokens = self.steady_tokens = self._step_tokens = 0
        self.steady_seconds = 0.0
        self.warmup = 1
        self._since: float | None = None  # when the steady clock last (re)started

    def collated(self, rows: list[dict[str, list[int]]]) -> None:
        if self.collecting:
            self.pending.append(sum(len(r["input_ids"]) for r in rows))

    def _trained(self, state) -> None:  # type: ignore[no-untyped-def]
        tokens = self.pending.popleft() if self.pending else 0
        self.tokens += tokens
        self._step_tokens += tokens
        state.num_input_tokens_seen += tokens  # what the progress bar and MLflow's tokens_per_s read

    def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.warmup = state.global_step + max(1, min(10, (state.max_steps - state.global_step) // 10))

    def on_substep_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self._trained(state)

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self._trained(state)
        # the clock stops here before an eval, a save or the end: let the device finish the step
        # first (once per eval or save, not per step)
        now = _synced_now(control.should_evaluate or control.should_save or state.global_step >= state.max_steps)
        if self._since is not None:
            self.steady_tokens += self._step_tokens
            self.steady_seconds += now - self._since
        self._step_tokens = 0
        self._since = now if state.global_step >= self.warmup else None
        if state.global_step >= state.max_steps:
            control.should_log = True
        if control.should_evaluate:
            self.collecting = False

    def _resume_clock(self) -> None:
        if self._since is not None:
            self._since = time.perf_counter()

    def on_evaluate(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.collecting = True
        self._resume_clock()

    def on_save(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self._resume_clock()

    @property
    def steady_rate(self) -> float | None:
        return self.steady_tokens / self.steady_seconds if self.steady_tokens and self.steady_seconds > 0 else None


class SealCheckpoints(TrainerCallback):
    """After each Trainer save, seal an lmctl checkpoint for that step.

    Every rank takes part: the Trainer's checkpoint-N is complete only once each rank wrote
    its share (its `rng_state_R.pth`), so all ranks meet at a barrier before rank 0 seals the
    twin that marks checkpoint-N complete; under FSDP they then gather the sharded adapter
    (a collective) and rank 0 writes it."""

    def __init__(self, seal_step: Callable[[Any, Any, dict[str, Any] | None], Path], world: World, fsdp: bool) -> None:
        self.seal_step, self.world, self.fsdp = seal_step, world, fsdp
        self.sealed_paths: list[Path] = []
        self.last_step: int | None = None

    def seal(self, model: Any, state: Any) -> None:
        from lmctl.train.fsdp import full_adapter_state

        self.world.barrier()
        weights = full_adapter_state(model) if self.fsdp else None
        if self.world.is_rank0:
            self.sealed_paths.append(self.seal_step(model, state, weights))
        self.last_step = state.global_step

    def on_save(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
        self.seal(model, state)


def log_data_inputs(client: Any, run_id: str, data_info: ManifestData) -> None:
    """Record the training and validation files on the MLflow run, with their fingerprints."""
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    inputs = []
    for context, fp in data_info.splits():
        dataset = Dataset(
            name=Path(fp.path).name, digest=fp.sha256[:32], source_type="local",
            source=json.dumps({"uri": fp.path}),
            profile=json.dumps({"num_rows": fp.rows, "format": fp.format, "sha256": fp.sha256}),
        )
        inputs.append(DatasetInput(dataset=dataset, tags=[InputTag(key="mlflow.data.context", value=context)]))
    if inputs:
        client.log_inputs(run_id, datasets=inputs)


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


class MlflowRun:
    """The MLflow run of a training run: params, data inputs, metrics, loss curve. Only rank 0
    tracks; under torchrun the other ranks get a no-op.

    The run opens in a background thread (importing MLflow and opening its store take seconds
    that the model's loading can hide); `ready()` waits for it and raises what it raised, and
    training calls it before the first step, so an unreachable tracking server still ends the
    run (exit 5) before anything is trained."""

    def __init__(self, cfg: LmctlConfig, data_info: ManifestData, rank0: bool) -> None:
        import threading

        self.client: Any = None
        self.run_id = ""
        self._error: BaseException | None = None
        self._opening: threading.Thread | None = None
        if rank0:
            self._opening = threading.Thread(target=self._open, args=(cfg, data_info), name="lmctl-mlflow", daemon=True)
            self._opening.start()

    def _open(self, cfg: LmctlConfig, data_info: ManifestData) -> None:
        try:
            from mlflow.entities import Param

            from lmctl import tracking

            with tracking.server_errors():  # an unreachable team server is exit 5, not a bug
                client = tracking.client(cfg.registry.tracking_uri)
                experiment = tracking.experiment_id(client, EXPERIMENT)
                self.run_id = client.create_run(experiment, run_name=str(cfg.output.run_name)).info.run_id
                self.client = client
                params = [Param(f"{section}.{key}", str(value)[:500])
                          for section, values in config_dump(cfg).items() for key, value in values.items()]
                client.log_batch(self.run_id, params=params)
                log_data_inputs(client, self.run_id, data_info)
        except BaseException as exc:  # noqa: BLE001 - raised in the training thread by ready()
            self._error = exc

    def ready(self) -> MlflowRun:
        """Wait until the MLflow run is open; raise the error that opening it met."""
        if self._opening is not None:
            self._opening.join()
            self._opening = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return self

    def callbacks(self) -> list[Any]:
        self.ready()
        return [MlflowMetrics(self.client, self.run_id)] if self.client else []

    def finish(self, status: str, history: list[dict[str, Any]] | None = None, run_dir: Path | None = None) -> None:
        try:
            self.ready()
        except BaseException:  # noqa: BLE001 - the run never opened: nothing to finish (the error is on its way)
            return
        if not self.client:
            return
        curve = save_loss_curve(history, run_dir / "loss_curve.png") if history and run_dir else None
        if curve is not None:
            self.client.log_artifact(self.run_id, str(curve))
        self.client.set_terminated(self.run_id, status)
