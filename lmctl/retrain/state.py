"""The persisted state of `lmctl retrain` runs: one JSON file per run, a lock per model.

A run is a fixed sequence of stages. Before a stage starts and after it ends the run's
`state.json` is rewritten atomically, so a process killed anywhere leaves a state that
names the stage it died in; the next invocation picks that run up again at that stage.
A run whose state says `done` is history: the next invocation starts a new run.

Layout under `retrain.state_dir` (default `LMCTL_HOME/retrain/<registry.name>`):
`runs/<run_id>/state.json`, `runs/<run_id>/eval.json`, `runs/<run_id>/report.json`.
The lock is `LMCTL_HOME/retrain/<name>.lock`, keyed by the registered model (the thing two
runs must not promote at once), with `<name>.holder.json` naming the process holding it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from lmctl.atomic import crash_point, write_json_atomic
from lmctl.clock import utc_now, utc_stamp
from lmctl.errors import BusyError
from lmctl.evaluate.compare import Gate
from lmctl.home import lmctl_home

log = logging.getLogger("lmctl.retrain")
STAGES = ("check_data", "train", "evaluate", "register", "promote", "report")
Stage = Literal["check_data", "train", "evaluate", "register", "promote", "report", "done"]
Outcome = Literal["promoted", "not_promoted", "skipped"]
# Fault injection for the kill-and-resume tests (and for anyone checking a deployment):
# the process SIGKILLs itself right after the named stage's state was persisted.
CRASH_ENV = "LMCTL_RETRAIN_CRASH_AFTER"


class StageRecord(BaseModel):
    name: str
    status: Literal["pending", "running", "done", "skipped"] = "pending"
    attempts: int = 0
    started_at: str | None = None
    seconds: float | None = None
    note: str | None = None


class RetrainState(BaseModel):
    """Everything a run decided so far; enough to resume it in a fresh process."""

    schema_version: str = "lmctl.retrain-state/1"
    run_id: str
    name: str
    config: str | None
    force: bool
    started_at: str
    stage: Stage = "check_data"
    invocations: int = 1
    stages: list[StageRecord] = Field(default_factory=lambda: [StageRecord(name=s) for s in STAGES])
    data_fingerprint: str | None = None
    config_sha256: str | None = None
    production_before: str | None = None
    baseline_version: str | None = None
    train_run_dir: str | None = None
    checkpoint: str | None = None
    training: dict[str, object] = Field(default_factory=dict)
    manifest_sha256: str | None = None
    eval_report: str | None = None
    evaluation: dict[str, object] = Field(default_factory=dict)
    drift: dict[str, object] | None = None  # the drift check's verdict, when retrain.drift_current is set
    gates: list[Gate] = Field(default_factory=list)
    candidate_version: str | None = None
    production_after: str | None = None
    result: Outcome | None = None
    reason: str | None = None
    report: str | None = None

    def record(self, name: str) -> StageRecord:
        return next(r for r in self.stages if r.name == name)


def new_run_id() -> str:
    """Sortable by start time (UTC), unique across processes started in the same second."""
    return utc_stamp() + "Z-" + secrets.token_hex(3)


class RunStore:
    """The runs of one registered model, on disk."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.runs = root / "runs"

    def run_dir(self, run_id: str) -> Path:
        return self.runs / run_id

    def save(self, state: RetrainState) -> None:
        write_json_atomic(self.run_dir(state.run_id) / "state.json", state.model_dump(mode="json"))

    def all_states(self) -> list[RetrainState]:
        """Every readable run state, oldest first (run ids sort by start time)."""
        states = []
        for path in sorted(self.runs.glob("*/state.json")):
            try:
                states.append(RetrainState.model_validate_json(path.read_text(encoding="utf-8")))
            except (OSError, ValueError) as exc:  # a hand-edited or foreign file: skip it, say so
                log.warning("warning: ignoring unreadable retrain state %s (%s)", path, str(exc).splitlines()[0])
        return states

    def unfinished(self, fetch: bool = True) -> RetrainState | None:
        """The newest run that has not reached `done`: the one to resume (`fetch` matters to
        the server store only: whether to download its files for resuming)."""
        pending = [s for s in self.all_states() if s.stage != "done"]
        return pending[-1] if pending else None

    def last_finished(self) -> RetrainState | None:
        done = [s for s in self.all_states() if s.stage == "done" and s.result != "skipped"]
        return done[-1] if done else None

    def latest(self) -> RetrainState | None:
        states = self.all_states()
        return states[-1] if states else None

    def upload_checkpoint(self, state: RetrainState) -> None:
        """Nothing to do: on one machine the checkpoint is already where a resumed run looks."""

    def sync_training(self, state: RetrainState, run_dir: Path) -> contextlib.AbstractContextManager[None]:
        """Nothing to do: training resumes from its own run directory on this machine."""
        return contextlib.nullcontext()

    def prune(self, keep: int) -> None:
        """Drop the oldest finished run records beyond `keep` (reports included; the registry keeps versions)."""
        finished = [s for s in self.all_states() if s.stage == "done"]
        last = self.last_finished()  # kept: the "already tried this data" check reads it
        for state in finished[:-keep]:
            if last is None or state.run_id != last.run_id:
                shutil.rmtree(self.run_dir(state.run_id), ignore_errors=True)


def open_store(name: str, state_dir: Path | None = None) -> RunStore:
    """The embedded store's files under `state_dir`, or on a team server its MLflow runs
    (lmctl.retrain.server_state.ServerRunStore, which has the same methods)."""
    from lmctl import registry

    root = state_dir or lmctl_home() / "retrain" / name
    if registry.embedded():
        return RunStore(root)
    from lmctl.retrain.server_state import ServerRunStore

    return ServerRunStore(name, root)  # type: ignore[return-value]


def versions_in_use(name: str, state_dir: Path | None = None) -> dict[str, str]:
    """Versions the unfinished retrain run of `name` still needs (registry gc keeps them)."""
    state = open_store(name, state_dir).unfinished(fetch=False)
    if state is None:
        return {}
    uses = {state.candidate_version: "its candidate", state.baseline_version: "its baseline",
            state.production_before: "production when it started"}
    return {v: f"used by unfinished retrain run {state.run_id} ({use})" for v, use in uses.items() if v}


def begin_stage(store: RunStore, state: RetrainState, name: str) -> float:
    rec = state.record(name)
    rec.status, rec.attempts, rec.started_at = "running", rec.attempts + 1, utc_now()
    store.save(state)
    return time.perf_counter()


def end_stage(store: RunStore, state: RetrainState, name: str, started: float, next_stage: Stage,
              note: str | None = None) -> None:
    rec = state.record(name)
    rec.status, rec.seconds, rec.note = "done", round(time.perf_counter() - started, 3), note
    state.stage = next_stage
    for skipped in STAGES[STAGES.index(name) + 1: STAGES.index(next_stage) if next_stage in STAGES else None]:
        state.record(skipped).status = "skipped"
    store.save(state)
    crash_point(CRASH_ENV, name)


def lock_path(name: str) -> Path:
    return lmctl_home() / "retrain" / f"{name}.lock"


@contextlib.contextmanager
def run_lock(name: str) -> Iterator[Callable[[], bool]]:
    """Hold the one retrain lock of model `name`; BusyError (exit 5) naming the holder if taken.

    Embedded store: a file lock under LMCTL_HOME (the OS frees it when its holder dies). Team
    server: a lock in the server's database, so it reaches every host; its holder's heartbeat
    keeps it, and only a heartbeat silent for LMCTL_LOCK_STALE_S breaks it. Yields a check:
    True once the lock was taken from this process (its heartbeat could not reach the server
    for that long), so the run stops at the next stage instead of racing the new holder."""
    from lmctl import registry

    busy, hint = f"a retrain of {name!r} is already running", "wait for it to finish; this run did nothing"
    if not registry.embedded():
        from lmctl.registry.mutex import RETRAIN_PREFIX, server_lock

        with server_lock(registry.client(), RETRAIN_PREFIX + name, wait_s=0, what=busy, hint=hint) as beat:
            yield lambda: beat.lost
        return
    from filelock import FileLock, Timeout

    path = lock_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    holder = path.with_suffix(".holder.json")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise BusyError(f"{busy} ({_describe_holder(holder)})", hint=hint) from None
    try:
        write_json_atomic(holder, {"pid": os.getpid(), "host": socket.gethostname(), "since": utc_now()})
        yield lambda: False  # the OS holds a file lock for as long as this process lives
    finally:
        with contextlib.suppress(OSError):
            holder.unlink()
        lock.release()


def lock_holder(name: str) -> str | None:
    """Who holds the retrain lock of `name` (None: nobody), without taking it."""
    from lmctl import registry

    if not registry.embedded():
        from lmctl.registry.mutex import RETRAIN_PREFIX, holder

        held = holder(registry.client(), RETRAIN_PREFIX + name)
        return held.describe() if held else None
    from filelock import FileLock, Timeout

    path = lock_path(name)
    if not path.exists():
        return None
    try:
        with FileLock(str(path)).acquire(timeout=0):
            return None
    except Timeout:
        return _describe_holder(path.with_suffix(".holder.json"))


def _describe_holder(holder: Path) -> str:
    try:
        info = json.loads(holder.read_text(encoding="utf-8"))
        return f"pid {info['pid']} on {info['host']} since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"
