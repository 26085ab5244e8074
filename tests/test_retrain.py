"""`lmctl retrain`: skip unchanged data, gate against production, resume after kills, one run at a time.

Everything is real: tiny models trained for a few steps, the embedded MLflow registry,
`lmctl retrain` as a child process killed with SIGKILL, and a local HTTP webhook.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
import yaml

from conftest import ASSETS, free_port, run_subprocess

STAGES = ["check_data", "train", "evaluate", "register", "promote", "report"]


@pytest.fixture
def config(tiny_config: Path, tmp_path: Path) -> Path:
    """The tiny config with a training file of its own (tests change it) and a retrain section."""
    train = tmp_path / "train.jsonl"
    train.write_text((ASSETS / "tiny_train.jsonl").read_text())
    cfg = yaml.safe_load(tiny_config.read_text())
    cfg["data"]["train"] = str(train)
    cfg["retrain"] = {"eval_data": str(ASSETS / "tiny_validation.jsonl"), "max_ppl_regression": 0.0}
    tiny_config.write_text(yaml.safe_dump(cfg))
    return tiny_config


def add_rows(config: Path, text: str) -> None:
    """New data arrived: the fingerprint changes."""
    train = Path(yaml.safe_load(config.read_text())["data"]["train"])
    train.write_text(train.read_text() + json.dumps({"text": text}) + "\n")


def versions() -> dict[str, list[str]]:
    from lmctl.versions import list_versions

    return {v.version: v.aliases for v in list_versions("tiny")}


def states(lmctl_home: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((lmctl_home / "retrain" / "tiny" / "runs").glob("*/state.json"))]


class Hook(BaseHTTPRequestHandler):
    received: ClassVar[list[dict]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Hook.received.append({"path": self.path, "body": body})
        self.send_response(500 if self.path == "/broken" else 204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def webhook() -> Iterator[str]:
    Hook.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_bad_input_is_exit_2_before_anything_is_written(cli, config: Path, tmp_path: Path, lmctl_home: Path,
                                                         webhook: str) -> None:
    suite = tmp_path / "s.yaml"
    suite.write_text("name: s\nkind: safety\nitems:\n  - {prompt: hi, forbidden: [x]}\n")
    cases = [("registry.name=null", "registry.name"), (f"retrain.eval_data={tmp_path / 'none.jsonl'}", "none.jsonl"),
             ("retrain.min_scores={other: 0.5}", "not in retrain.suites: other"),
             ("retrain.candidate_alias=v2", "invalid alias")]
    for override, message in cases:
        result = cli("retrain", config, "--set", override, "--set", f"retrain.suites=[{suite}]",
                     "--set", f"retrain.webhook_url={webhook}/hook", "--json")
        assert result.code == 2 and message in result.err and result.out == "", (override, result.err)
    assert not (lmctl_home / "retrain").exists() and not (tmp_path / "runs").exists()
    # a scheduled job has nobody reading its stderr: failures reach the webhook too
    bodies = [h["body"] for h in Hook.received]
    assert [(b["result"], b["exit_code"]) for b in bodies] == [("failed", 2)] * len(cases)
    assert "none.jsonl" in bodies[1]["error"]


def test_scheduled_runs_promote_skip_reject_and_promote_again(cli, config: Path, lmctl_home: Path, webhook: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """One model's life under a schedule: first production, unchanged data, a worse candidate, a better one."""
    from lmctl import registry

    # 1. No production yet: no baseline, promoted; the webhook receives the result.
    first = cli("retrain", config, "--set", f"retrain.webhook_url={webhook}/hook", "--json")
    assert first.code == 0, first.err
    result = first.json
    assert result["result"] == "promoted" and "first production version" in result["reason"]
    assert (result["production_before"], result["production_after"], result["candidate_version"]) == (None, "1", "1")
    assert [s["status"] for s in result["stages"]] == ["done"] * 6 and result["gates"] == []
    assert versions() == {"1": ["candidate", "production"]}
    status = cli("retrain", "--status", "tiny", "--json").json  # nothing runs now; the last run is shown
    assert status["running"] is False and status["holder"] is None
    assert (status["run"]["run_id"], status["run"]["stage"], status["run"]["result"]) == (result["run_id"], "done", "promoted")
    report = json.loads(Path(result["report"]).read_text())
    assert report["result"] == "promoted" and report["run_id"] == result["run_id"]
    assert report["evaluation"]["perplexity"] == result["evaluation"]["perplexity"] > 1
    moves = registry.alias_history("tiny", "production")
    assert len(moves) == 1 and moves[0].reason == f"retrain {result['run_id']}: {result['reason']}"
    assert [h["body"]["result"] for h in Hook.received] == ["promoted"]
    assert Hook.received[0]["body"]["run_id"] == result["run_id"]

    # 2. Unchanged data: skipped, exit 0, nothing trained or registered. The webhook URL now
    # comes from the environment and nothing listens there: a warning, never a failure.
    monkeypatch.setenv("LMCTL_WEBHOOK_URL", f"http://127.0.0.1:{free_port()}/hook")
    second = cli("retrain", config, "--json")
    assert second.code == 0, second.err
    assert second.json["result"] == "skipped" and "data unchanged" in second.json["reason"]
    assert [s["status"] for s in second.json["stages"]] == ["done", "skipped", "skipped", "skipped", "skipped", "done"]
    assert "webhook not delivered" in second.err
    monkeypatch.delenv("LMCTL_WEBHOOK_URL")
    assert versions() == {"1": ["candidate", "production"]}
    assert len(list((config.parent / "runs").glob("tiny-retrain-*"))) == 1
    assert not (lmctl_home / "retrain" / "tiny.holder.json").exists()  # released with the lock

    # 3. New data, but one step at a vanishing learning rate: the candidate is the untrained
    # base, worse than v1 on the fixed eval set. Registered as candidate, not promoted, exit 3.
    add_rows(config, "A new document arrived after production was trained.")
    weak = ["--set", "train.lr=1e-7", "--set", "train.max_steps=1", "--set", f"retrain.webhook_url={webhook}/broken"]
    worse = cli("retrain", config, *weak, "--json")
    assert worse.code == 3, worse.err
    result = worse.json
    assert result["result"] == "not_promoted" and result["candidate_version"] == "2"
    assert result["production_before"] == result["production_after"] == "1"
    gate = result["gates"][0]
    assert not gate["passed"] and gate["value"] > 0 and "regression" in gate["name"]
    assert result["evaluation"]["perplexity"] > result["evaluation"]["baseline_perplexity"]
    assert "not promoted" in worse.err and "FAIL" in worse.err
    assert "webhook not delivered (HTTP 500)" in worse.err  # a failing webhook changes no exit code
    assert Hook.received[-1]["body"]["result"] == "not_promoted"
    assert versions() == {"1": ["production"], "2": ["candidate"]}

    # 4. The same data and config again would rebuild the rejected candidate: skipped.
    again = cli("retrain", config, *weak, "--json")
    assert again.code == 0 and again.json["result"] == "skipped" and "not promoted" in again.json["reason"]
    # 5. --force retrains anyway; with a looser gate the candidate passes against v1.
    forced = cli("retrain", config, "--force", "--set", "retrain.max_ppl_regression=5", "--json")
    assert forced.code == 0, forced.err
    assert forced.json["result"] == "promoted" and "gates passed against v1" in forced.json["reason"]
    assert versions() == {"1": [], "2": [], "3": ["candidate", "production"]}


def _start(config: Path, crash_env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "lmctl", "retrain", str(config), "--json"], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **crash_env})


def _killed(proc: subprocess.Popen[str], what: str) -> None:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL, (what, err[-2000:])
    assert out == ""  # killed before any result


def _wait_for_holder(holder: Path, proc: subprocess.Popen[str]) -> None:
    """Until `proc` holds the retrain lock (a killed run leaves a stale holder.json behind)."""
    deadline = time.monotonic() + 180
    while True:
        try:
            if json.loads(holder.read_text())["pid"] == proc.pid:
                return
        except (OSError, ValueError):
            pass
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.05)


def test_killed_after_each_stage_resumes_there_without_duplicates(cli, config: Path, lmctl_home: Path) -> None:
    """Real processes, each SIGKILLed right after one stage (and one inside `register`); each
    next one resumes there. While one of them trains, a concurrent `lmctl retrain` gets exit 5."""
    from lmctl import registry
    from lmctl.registry.register import register
    from lmctl.versions import list_versions

    holder = lmctl_home / "retrain" / "tiny.holder.json"
    for stage in STAGES:
        if stage == "register":
            # Killed inside `register`, after the version was created and before it was complete:
            # the version is FAILED, never adopted; the next register removes it.
            _killed(_start(config, {"LMCTL_REGISTER_CRASH_AT": "after_version"}), "mid-register")
            assert [v.status for v in list_versions("tiny")] == ["FAILED"]
            # A register that completed but whose retrain died before saving the state leaves
            # exactly this behind; the resumed run must adopt it, not register again.
            register(Path(states(lmctl_home)[0]["checkpoint"]), "tiny")
        proc = _start(config, {"LMCTL_RETRAIN_CRASH_AFTER": stage})
        if stage == "train":
            _wait_for_holder(holder, proc)
            busy = run_subprocess("retrain", str(config), "--json")
            assert busy.returncode == 5 and busy.stdout == "", busy.stderr[-2000:]
            assert f"pid {proc.pid}" in busy.stderr and busy.stderr.count("\n") == 1
            status = cli("retrain", "--status", "tiny", "--json").json
            assert status["running"] is True and f"pid {proc.pid}" in status["holder"]
        _killed(proc, stage)
        state = states(lmctl_home)[0]
        done = [s["name"] for s in state["stages"] if s["status"] == "done"]
        assert done == STAGES[: STAGES.index(stage) + 1], stage
    assert len(states(lmctl_home)) == 1  # one run, resumed six times; the busy one wrote nothing
    state = states(lmctl_home)[0]
    assert state["stage"] == "done" and state["result"] == "promoted" and state["invocations"] == 7
    attempts = {s["name"]: s["attempts"] for s in state["stages"]}
    assert attempts == {**dict.fromkeys(STAGES, 1), "register": 2}  # only the stage killed inside ran twice
    assert versions() == {"2": ["candidate", "production"]}  # the killed registration's v1 is gone
    assert [m.alias for m in registry.alias_history("tiny")] == ["candidate", "production"]  # no move twice
    report = json.loads(Path(state["report"]).read_text())
    assert report["result"] == "promoted" and report["candidate_version"] == "2" and report["resumed"]


@pytest.mark.slow  # two full processes and 40 steps; `lmctl train` resume itself is tested in test_train
def test_killed_while_training_resumes_from_its_checkpoint(config: Path, lmctl_home: Path, tmp_path: Path) -> None:
    common = ["--set", "train.max_steps=40", "--set", "train.save_every=2", "--set", "train.eval_every=1000"]
    proc = subprocess.Popen([sys.executable, "-m", "lmctl", "retrain", str(config), *common, "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.monotonic() + 180
    while not list((tmp_path / "runs").glob("tiny-retrain-*/checkpoints/step-000002/lmctl.json")):
        assert proc.poll() is None and time.monotonic() < deadline, "training ended before its first checkpoint"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    resumed = run_subprocess("retrain", str(config), *common, "--json")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    result = json.loads(resumed.stdout)
    train = next(s for s in result["stages"] if s["name"] == "train")
    assert result["result"] == "promoted" and result["resumed"] and train["attempts"] == 2
    state = states(lmctl_home)[0]
    assert "checkpoint-" in str(state["training"]["resumed_from"]) and state["training"]["steps"] == 40
    assert len(list((tmp_path / "runs").glob("tiny-retrain-*"))) == 1  # the same run directory, continued
    assert versions() == {"1": ["candidate", "production"]}


def test_drift_gate_retrains_only_when_production_inputs_drifted(cli, config: Path, tmp_path: Path) -> None:
    cfg = yaml.safe_load(config.read_text())
    cfg["retrain"]["max_ppl_regression"] = 1000.0  # this test is about when to train, not whether to promote
    cfg["drift"] = {"min_documents": 10, "max_rare_rate_increase": None}
    config.write_text(yaml.safe_dump(cfg))
    first = cli("retrain", str(config), "--json")  # no production yet: no model to measure drift with
    assert first.code == 0 and first.json["result"] == "promoted" and first.json["drift"] is None, first.err

    add_rows(config, "New rows arrived overnight.")
    same = cli("retrain", str(config), "--set", f"retrain.drift_current={ASSETS / 'drift_current_same.jsonl'}", "--json")
    assert same.code == 0 and same.json["result"] == "skipped", same.err
    assert same.json["reason"].startswith("no drift") and same.json["drift"]["detected"] is False
    assert json.loads(Path(same.json["drift"]["report"]).read_text())["drift_detected"] is False
    assert list(versions()) == ["1"]

    drifted = cli("retrain", str(config), "--set", f"retrain.drift_current={ASSETS / 'drift_current_shifted.jsonl'}", "--json")
    assert drifted.code == 0 and drifted.json["result"] == "promoted", drifted.err
    assert drifted.json["drift"]["detected"] is True and "token length PSI" in " ".join(drifted.json["drift"]["failed_checks"])
    assert sorted(versions()) == ["1", "2"]

    missing = cli("retrain", str(config), "--set", f"retrain.drift_current={tmp_path / 'nope.jsonl'}")
    assert missing.code == 2 and "drift_current" in missing.err


def test_an_unreachable_tracking_server_is_exit_5(cli, config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Team mode with the server gone: one line naming it, exit 5 (run again), nothing written."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own retries: not the subject here
    result = cli("retrain", config, "--json")
    assert result.code == 5 and result.out == "", result.err
    assert "tracking server http://127.0.0.1:" in result.err and "unavailable" in result.err
    assert result.err.count("\n") == 1
    status = cli("retrain", "--status", "tiny")
    assert status.code == 5 and "unavailable" in status.err
