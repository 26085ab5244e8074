"""Where a model's retrain runs live: files under LMCTL_HOME (`RunStore`) or, on a team server,
MLflow runs (`ServerRunStore`); and the versions an unfinished run still needs."""

from __future__ import annotations

from pathlib import Path

from lmctl import tracking
from lmctl.home import lmctl_home
from lmctl.retrain.server_state import ServerRunStore
from lmctl.retrain.state import RunStore


def open_store(name: str, state_dir: Path | None = None) -> RunStore:
    """The embedded store's files under `state_dir`, or on a team server its MLflow runs
    (lmctl.retrain.server_state.ServerRunStore, which has the same methods)."""
    root = state_dir or lmctl_home() / "retrain" / name
    if tracking.embedded():
        return RunStore(root)
    return ServerRunStore(name, root)  # type: ignore[return-value]


def versions_in_use(name: str, state_dir: Path | None = None) -> dict[str, str]:
    """Versions the unfinished retrain run of `name` still needs (registry gc keeps them)."""
    state = open_store(name, state_dir).unfinished(fetch=False)
    if state is None:
        return {}
    uses = {state.candidate_version: "its candidate", state.baseline_version: "its baseline",
            state.production_before: "production when it started"}
    return {v: f"used by unfinished retrain run {state.run_id} ({use})" for v, use in uses.items() if v}
