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
import logging
import secrets
import shutil
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from lmctl.atomic import crash_point, write_json_atomic
from lmctl.clock import utc_now, utc_stamp
from lmctl.evaluate.compare import Gate

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
