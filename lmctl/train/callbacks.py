"""Training-time side channels: the MLflow run, a rich progress bar, sealing checkpoints, and the
run's real tokens and steady-state throughput, counted on the host."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from lmctl.checkpoint import ManifestData
from lmctl.config import LmctlConfig, config_dump
from lmctl.distributed import World
from lmctl.errors import LmctlError

if TYPE_CHECKING:
    from lmctl.train.mlflow_worker import Worker

log = logging.getLogger("lmctl.train")


class MlflowMetrics(TrainerCallback):
    """Log every Trainer log line (loss, lr, eval_loss, tokens/s) to one MLflow run."""

    def __init__(self, run: MlflowRun) -> None:
        self.run = run
        self.t0 = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
        now = int(time.time() * 1000)
        values = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))}
        elapsed = time.perf_counter() - self.t0
        if state.num_input_tokens_seen and elapsed > 0:
            values["tokens_per_s"] = state.num_input_tokens_seen / elapsed
        if values:
            self.run.log_metrics([[k, v, now, state.global_step] for k, v in values.items()])


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


class MlflowRun:
    """The MLflow run of a training run: params, data inputs, metrics, loss curve. Only rank 0
    tracks; under torchrun the other ranks get a no-op.

    MLflow runs in a worker process (lmctl.train.mlflow_worker: importing it and opening its store
    take seconds of Python that a thread could not overlap with the model's loading), or in a
    thread where this process has imported MLflow already (mlflow_worker.InProcess). The run opens
    there while the model loads; `ready()` waits for it and raises what it raised, and training
    calls it before the first step, so an unreachable tracking server still ends the run (exit 5)
    before anything is trained. Metrics are sent without waiting; a failure to log them is raised
    by `finish("FINISHED")`, after the checkpoints are sealed."""

    def __init__(self, cfg: LmctlConfig, data_info: ManifestData, worker: Worker | None) -> None:
        """`worker`: lmctl.train.mlflow_worker.spawn's process (rank 0), None elsewhere."""
        self.run_id = ""
        self._worker = worker
        if worker is not None:
            self._send({"open": open_request(cfg, data_info)})

    def _send(self, message: dict[str, Any]) -> None:
        assert self._worker is not None and self._worker.stdin is not None
        self._worker.stdin.write(json.dumps(message) + "\n")
        self._worker.stdin.flush()

    def _reply(self) -> dict[str, Any]:
        assert self._worker is not None and self._worker.stdout is not None
        line = self._worker.stdout.readline()
        if not line:
            self._stop()
            raise LmctlError("the MLflow worker process ended without an answer (see the lines above)")
        reply = json.loads(line)
        if "error" in reply:
            self._stop()
            raise_described(reply["error"])
        return reply

    def _stop(self) -> None:
        from lmctl.train import mlflow_worker

        if self._worker is not None:
            mlflow_worker.stop(self._worker)
            self._worker = None

    def ready(self) -> MlflowRun:
        """Wait until the MLflow run is open; raise the error that opening it met (once)."""
        if self._worker is not None and not self.run_id:
            self.run_id = self._reply()["run_id"]
        return self

    def callbacks(self) -> list[Any]:
        self.ready()
        return [MlflowMetrics(self)] if self._worker is not None else []

    def log_metrics(self, rows: list[list[Any]]) -> None:
        """[key, value, timestamp ms, step] rows, sent without waiting for MLflow."""
        if self._worker is not None:
            self._send({"metrics": rows})

    def finish(self, status: str, history: list[dict[str, Any]] | None = None, run_dir: Path | None = None) -> None:
        """End the run with `status`; FINISHED raises what MLflow met, KILLED (the trainer is failing
        with an error of its own) only logs it."""
        try:
            self.ready()
            if self._worker is None:
                return
            points = [{k: h[k] for k in ("step", "loss", "eval_loss") if k in h} for h in history or []]
            self._send({"finish": {"status": status, "history": points, "run_dir": str(run_dir) if run_dir else None}})
            self._reply()
        except BaseException as exc:
            if status == "FINISHED":
                raise
            log.warning("warning: the MLflow run was not ended: %s", exc)
        finally:
            self._stop()


def open_request(cfg: LmctlConfig, data_info: ManifestData) -> dict[str, Any]:
    """What the worker needs to open the run: plain JSON."""
    from lmctl import tracking

    params = [[f"{section}.{key}", str(value)[:500]] for section, values in config_dump(cfg).items()
              for key, value in values.items()]
    inputs = [{"context": context, "path": fp.path, "sha256": fp.sha256, "rows": fp.rows, "format": fp.format}
              for context, fp in data_info.splits()]
    return {"tracking_uri": tracking.tracking_uri(cfg.registry.tracking_uri), "run_name": str(cfg.output.run_name), "params": params,
            "inputs": inputs}


def raise_described(error: dict[str, Any]) -> None:
    """Raise the worker's error as the class it was, when it is one of lmctl.errors'."""
    from lmctl import errors

    cls = getattr(errors, error["type"], None)
    if isinstance(cls, type) and issubclass(cls, errors.LmctlError):
        raise cls(error["message"], hint=error["hint"])
    failed = errors.LmctlError(f"MLflow: {error['type']}: {error['message']}")
    failed.exit_code = error["exit_code"]
    raise failed
