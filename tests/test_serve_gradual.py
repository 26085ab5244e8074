"""Gradual rollout over real HTTP: steps advance, a failing canary rolls back, a restart resumes, and a
completed rollout moves the alias through the registry's promote gate into its audit trail (real MLflow
sqlite store under the test's LMCTL_HOME)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import copy_checkpoint
from serve_support import log_records
from test_serve_rollout import _complete, _server, _variant

FAST = {"step_min_s": 0.05, "step_min_requests": 3}
LENIENT = {"window_s": 120, "min_requests": 2, "max_error_rate_margin": 0.05, "max_p95_margin_pct": 1e6}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, sealed_checkpoint: Path) -> Path:
    return copy_checkpoint(sealed_checkpoint, tmp_path_factory.mktemp("gradual"))


def _rollout(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/healthz").json()["rollout"]


def _drive(url: str, until: Any, limit: int = 400, temperature: float = 1.0) -> list[int]:
    """Requests until `until(rollout report)` holds; the status codes seen."""
    codes = []
    for _ in range(limit):
        if until(_rollout(url)):
            return codes
        codes.append(_complete(url, max_tokens=4, temperature=temperature).status_code)
    raise AssertionError(f"rollout did not get there: {_rollout(url)}")


def _wait(url: str, until: Any, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while not until(report := _rollout(url)):
        assert time.monotonic() < deadline, report
        time.sleep(0.05)
    return report


def test_steps_advance_and_completion_promotes_through_the_audit_trail(cli, checkpoint: Path, tmp_path: Path) -> None:
    twin = _variant(checkpoint, tmp_path / "twin", 1.0)
    assert cli("register", str(checkpoint), "--name", "tiny").code == 0
    assert cli("register", str(twin), "--name", "tiny").code == 0
    from lmctl import registry

    registry.move_alias("tiny", "production", "1", reason="test")
    options = {"canary": "models:/tiny/2", "rollout": {"steps": "0.25,0.5,1.0", **FAST}, "canary_policy": LENIENT}
    with log_records("lmctl.serve") as records, _server("models:/tiny@production", **options) as srv:
        assert _rollout(srv.url)["weight"] == 0.25
        codes = _drive(srv.url, lambda r: r["status"] != "running")
        report = _wait(srv.url, lambda r: r["status"] not in ("running", "promoting"))
        assert report["status"] == "promoted", report
        assert set(codes) == {200} and report["step"] == 2 and report["weight"] == 1.0
        events = httpx.get(f"{srv.url}/healthz").json()["events"]
    kinds = [e["event"] for e in events]
    assert kinds == ["rollout_started", "rollout_step", "rollout_step", "rollout_completed", "rollout_promoted"]
    assert [e["weight"] for e in events[:3]] == [0.25, 0.5, 1.0]
    assert all(e["evidence"]["step_requests"] >= 3 for e in events[1:4])
    logged = [json.loads(r.getMessage())["event"] for r in records if r.getMessage().startswith('{"event": "rollout')]
    assert logged == kinds  # every step is a log line too
    last = cli("registry", "history", "tiny", "--json").json["moves"][-1]
    assert (last["alias"], last["version"], last["previous_version"], last["forced"]) == ("production", "2", "1", True)
    assert last["reason"].startswith("gradual rollout completed: ") and "within margins" in last["reason"]
    state = json.loads(Path(report["state_file"]).read_text())
    assert state["status"] == "promoted" and state["promotion"]["version"] == "2"

    state["status"] = "promoting"  # as if the server had stopped between the decision and the move
    Path(report["state_file"]).write_text(json.dumps(state))
    with _server("models:/tiny@production", **options) as srv:
        assert _wait(srv.url, lambda r: r["status"] != "promoting")["status"] == "promoted"
    assert len(cli("registry", "history", "tiny", "--json").json["moves"]) == 2  # finished, not moved twice


def test_failing_canary_rolls_back_and_stays_rolled_back_after_a_restart(checkpoint: Path, tmp_path: Path) -> None:
    broken = _variant(checkpoint, tmp_path / "broken", float("nan"))
    options = {"canary": str(broken), "rollout": {"steps": "0.5,1.0", **FAST}, "canary_policy": LENIENT}
    with _server(checkpoint, **options) as srv:
        codes = _drive(srv.url, lambda r: r["status"] != "running")
        report = _rollout(srv.url)
        assert report["status"] == "rolled_back" and report["step"] == 0 and "error rate" in report["reason"]
        assert 500 in codes
        primary = httpx.get(f"{srv.url}/healthz").json()["primary"]["version"]
    with _server(checkpoint, **options) as srv:  # restart: the recorded rollback holds
        report = _rollout(srv.url)
        assert report["status"] == "rolled_back"
        assert httpx.get(f"{srv.url}/healthz").json()["canary"]["state"] == "rolled_back"
        after = [_complete(srv.url, max_tokens=2) for _ in range(8)]
        assert all(r.status_code == 200 and r.headers["x-model-version"] == primary for r in after)


def test_restart_resumes_at_the_recorded_step(checkpoint: Path, tmp_path: Path) -> None:
    twin = _variant(checkpoint, tmp_path / "twin", 1.0)
    options = {"canary": str(twin), "rollout": {"steps": "0.25,0.5,1.0", **FAST, "step_min_requests": 3},
               "canary_policy": LENIENT}
    with _server(checkpoint, **options) as srv:
        _drive(srv.url, lambda r: r["step"] >= 1)
        path = Path(_rollout(srv.url)["state_file"])
    recorded = json.loads(path.read_text())
    assert (recorded["status"], recorded["step"], recorded["weight"]) == ("running", 1, 0.5)
    options["rollout"]["step_min_s"] = 3600  # the resumed step must earn its duration again: it cannot advance now
    with _server(checkpoint, **options) as srv:
        report = _rollout(srv.url)
        assert (report["status"], report["step"], report["weight"], report["step_requests"]) == ("running", 1, 0.5, 0)
        assert httpx.get(f"{srv.url}/healthz").json()["canary"]["weight"] == 0.5
        _drive(srv.url, lambda r: r["step_requests"] >= 5)
        assert _rollout(srv.url)["step"] == 1
        events = httpx.get(f"{srv.url}/healthz").json()["events"]
        assert events[-1]["event"] == "rollout_resumed" and "step 2 of 3" in events[-1]["detail"]


def test_shadow_agreement_below_the_floor_rolls_the_canary_back(checkpoint: Path, tmp_path: Path) -> None:
    other = str(_variant(checkpoint, tmp_path / "other", -40.0))  # adapter flipped and blown up: other greedy text
    options = {"canary": other, "shadow": other, "rollout": {"steps": "0.1,1.0", **FAST, "min_agreement": 0.9},
               "canary_policy": LENIENT}
    with _server(checkpoint, **options) as srv:
        _drive(srv.url, lambda r: r["status"] != "running", temperature=0)
        report, health = _rollout(srv.url), httpx.get(f"{srv.url}/healthz").json()
        assert report["status"] == "rolled_back" and "shadow agreement" in report["reason"], report
        shadow = health["shadow"]
        assert shadow["version"] == health["canary"]["version"]  # the canary's loaded model, shared
        assert shadow["compared"] >= 2 and shadow["agreement"] < 0.9
        assert shadow["first_difference"]["min"] >= 0


def test_bad_steps_are_refused_before_loading(cli) -> None:
    result = cli("serve", "x", "--canary", "y", "--canary-steps", "0.5,0.2")
    assert result.code == 2 and "--canary-steps" in result.err
    result = cli("serve", "x", "--canary-steps", "0.5,1")
    assert result.code == 2 and "--canary-steps needs --canary" in result.err
    result = cli("serve", "x", "--canary", "y", "--canary-min-agreement", "0.9")
    assert result.code == 2 and "needs --shadow" in result.err
