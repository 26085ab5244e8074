"""Team mode: the lmctl registry commands against a real `mlflow server` on PostgreSQL.

One server per session (scripts/team_server.py: a throwaway PostgreSQL cluster plus
`mlflow server --serve-artifacts`, both on loopback); every test uses its own model name
and its own LMCTL_HOME, so each starts with an empty download cache and shares nothing
with the others but the server, as engineers on different machines would.

Run with `pytest -m team`. Without PostgreSQL binaries the suite skips, except in CI
(`CI` or `LMCTL_REQUIRE_TEAM=1` set), where it fails: CI must prove team mode.
Selecting tests with a `-m` expression that does not mention `team` (as `make test`
does with `-m "not slow"`) skips them, so the default suite does not start a server.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import ASSETS, REPO, run_subprocess

pytestmark = pytest.mark.team
VERSIONS = 8  # concurrent registers


def _team_server_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("team_server", REPO / "scripts" / "team_server.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _required() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false") or os.environ.get("LMCTL_REQUIRE_TEAM") == "1"


@pytest.fixture(scope="session")
def team_server(request: pytest.FixtureRequest) -> Iterator[dict]:
    """PostgreSQL + mlflow server for the whole session; skipped or failed when PostgreSQL is missing."""
    markexpr = request.config.getoption("markexpr") or ""
    if markexpr and "team" not in markexpr:
        pytest.skip("team suite: select it with `pytest -m team`")
    ts = _team_server_module()
    if ts.pg_bindir() is None:
        message = "PostgreSQL server binaries not found (apt-get install -y postgresql)"
        if _required():
            pytest.fail(f"team suite required in CI: {message}")
        pytest.skip(message)
    # Not pytest's tmp_path: its 0700 parents are closed to the postgres user the cluster runs as.
    root = Path(tempfile.mkdtemp(prefix="lmctl-team-"))
    root.chmod(0o755)
    try:
        yield ts.start(root / "server")
    finally:
        ts.stop(root / "server")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def team_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, team_server: dict) -> Path:
    """One tiny LoRA checkpoint for the module, trained for real and tracked on the team server."""
    root = tmp_path_factory.mktemp("team-train")
    config = {
        "model": {"base": str(tiny_base)},
        "data": {"train": str(ASSETS / "tiny_train.jsonl"), "validation": str(ASSETS / "tiny_validation.jsonl"),
                 "max_length": 64},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"max_steps": 6, "batch_size": 4, "lr": 5e-3, "eval_every": 3, "save_every": 3},
        "output": {"dir": str(root / "runs"), "run_name": "team"},
    }
    (root / "team.yaml").write_text(json.dumps(config))  # JSON is YAML
    result = run_subprocess("train", str(root / "team.yaml"), "--json",
                            env={"LMCTL_HOME": str(root / "home"), "MLFLOW_TRACKING_URI": team_server["tracking_uri"]})
    assert result.returncode == 0, result.stderr[-2000:]
    return Path(json.loads(result.stdout)["checkpoint"])  # stdout is exactly the result, even with an HTTP server


@pytest.fixture
def team(team_server: dict, monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", team_server["tracking_uri"])
    return team_server


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _promote_args(name: str, version: str) -> list[str]:
    """Promotion gates are tested elsewhere; here a forced move, with the reason it requires."""
    return ["promote", name, version, "--force", "--reason", "team test", "--json"]


def _eval_report(cli, ref: Path, data: Path, out: Path) -> Path:  # type: ignore[no-untyped-def]
    result = cli("eval", ref, "--data", data, "--report", out, "--json")
    assert result.code == 0, result.err
    return out


def test_register_verify_through_proxied_artifacts(cli, team: dict, team_checkpoint: Path, tmp_path: Path) -> None:
    name = _name("team-verify")
    reg = cli("register", team_checkpoint, "--name", name, "--json")
    assert reg.code == 0, reg.err
    assert reg.json["version"] == "1" and reg.json["tracking_uri"] == team["tracking_uri"]
    # Proxied: the version's artifacts live in the server's store, addressed through the server.
    assert reg.json["source"].startswith("mlflow-artifacts:/")
    stored = list(Path(team["artifacts"]).rglob(f"{reg.json['run_id']}/artifacts/checkpoint/lmctl.json"))
    assert len(stored) == 1

    listed = cli("registry", "list", name, "--json")
    assert [(v["version"], v["status"]) for v in listed.json["versions"]] == [("1", "READY")]
    shown = cli("registry", "show", name, "--json").json
    assert shown["tags"]["lmctl.manifest_sha256"]
    assert cli("registry", "verify", f"models:/{name}/1", "--json").json["verified"] is True

    # Corrupt the server's copy, drop the local download: verify re-downloads, re-hashes, exits 4.
    adapter = stored[0].parent / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:-8] + b"\0" * 8)
    shutil.rmtree(Path(os.environ["LMCTL_HOME"]) / "cache")
    tampered = cli("registry", "verify", f"models:/{name}/1")
    assert tampered.code == 4, tampered.err
    assert "adapter_model.safetensors" in tampered.err


def test_promote_history_rollback_diff(cli, team: dict, team_checkpoint: Path, tmp_path: Path) -> None:
    name = _name("team-promote")
    early = min(team_checkpoint.parent.glob("step-*"))  # the step-3 checkpoint of the same run
    assert early != team_checkpoint and (early / "lmctl.json").is_file()
    data = ASSETS / "tiny_validation.jsonl"
    for ckpt, report in ((early, tmp_path / "early.json"), (team_checkpoint, tmp_path / "late.json")):
        _eval_report(cli, ckpt, data, report)
        assert cli("register", ckpt, "--name", name, "--eval", report, "--json").code == 0

    for version in ("1", "2"):
        moved = cli(*_promote_args(name, version))
        assert moved.code == 0, moved.err
    assert moved.json["previous_version"] == "1"
    assert cli("registry", "show", f"{name}@production", "--json").json["version"] == "2"

    back = cli("rollback", name, "--json")
    assert back.code == 0, back.err
    assert (back.json["version"], back.json["previous_version"], back.json["action"]) == ("1", "2", "rollback")
    assert cli("registry", "show", f"{name}@production", "--json").json["version"] == "1"
    moves = cli("registry", "history", name, "--json").json["moves"]
    assert [(m["action"], m["version"]) for m in moves] == [("promote", "1"), ("promote", "2"), ("rollback", "1")]

    diff = cli("registry", "diff", f"models:/{name}/1", f"models:/{name}/2", "--json")
    assert diff.code == 0, diff.err
    assert diff.json["identical"] is False
    assert "perplexity" in {c["key"] for c in diff.json["metrics"]}


def test_concurrent_registers_from_separate_machines(cli, team: dict, team_checkpoint: Path, tmp_path: Path) -> None:
    """8 processes, each with its own LMCTL_HOME (so no shared local lock), one new model name:
    the server alone must hand out 8 distinct, complete versions."""
    name = _name("team-concurrent")
    procs = [
        subprocess.Popen([sys.executable, "-m", "lmctl", "register", str(team_checkpoint), "--name", name, "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "LMCTL_HOME": str(tmp_path / f"machine-{i}")})
        for i in range(VERSIONS)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * VERSIONS, [err[-800:] for _, err in outs]
    reported = sorted(int(json.loads(out)["version"]) for out, _ in outs)
    assert reported == list(range(1, VERSIONS + 1))
    versions = cli("registry", "list", name, "--json").json["versions"]
    assert sorted(int(v["version"]) for v in versions) == reported
    assert all(v["status"] == "READY" for v in versions)
    for v in versions:
        assert cli("registry", "verify", f"models:/{name}/{v['version']}").code == 0
    # 8 machines promote at once: the server-side mutex serializes the moves, so every applied
    # move is in the audit history and each entry's previous version is the one before it
    promoters = [
        subprocess.Popen([sys.executable, "-m", "lmctl", *_promote_args(name, str(v)), "--alias", "live"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "LMCTL_HOME": str(tmp_path / f"machine-{v}")})
        for v in range(1, VERSIONS + 1)
    ]
    outs = [p.communicate(timeout=300) for p in promoters]
    codes = [p.returncode for p in promoters]
    # a promotion checks the holder first and again under the lock: one that saw another move
    # land in between is refused (exit 3) rather than applied over a holder it never checked
    assert set(codes) <= {0, 3} and 0 in codes, [err[-800:] for _, err in outs]
    assert all("moved to" in err for (_, err), code in zip(outs, codes) if code == 3)
    moves = cli("registry", "history", name, "--json").json["moves"]
    assert len(moves) == codes.count(0)  # no applied move lost from the history
    assert [m["previous_version"] for m in moves] == [None] + [m["version"] for m in moves[:-1]]


def test_a_stale_server_lock_is_broken(cli, team: dict, team_checkpoint: Path) -> None:
    """A promoter killed while holding the server-side lock must not block promotions forever."""
    from lmctl import registry
    from lmctl.registry.mutex import OWNER_TAG, PREFIX, SINCE_TAG

    name = _name("team-stale")
    assert cli("register", str(team_checkpoint), "--name", name).code == 0
    registry.client().create_registered_model(PREFIX + name, tags={OWNER_TAG: "dead-host:1:x", SINCE_TAG: "0"})
    assert cli(*_promote_args(name, "1")).code == 0
    assert not registry.client().search_registered_models(f"name='{PREFIX + name}'")
