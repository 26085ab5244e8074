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

from conftest import ASSETS, REPO, run_subprocess, tiny_config_dict

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
    config = tiny_config_dict(tiny_base, root / "runs")
    config["output"]["run_name"] = "team"
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
    from lmctl import tracking
    from lmctl.registry.mutex import OWNER_TAG, PREFIX, SINCE_TAG

    name = _name("team-stale")
    assert cli("register", str(team_checkpoint), "--name", name).code == 0
    tracking.client().create_registered_model(PREFIX + name, tags={OWNER_TAG: "dead-host:1:x", SINCE_TAG: "0"})
    assert cli(*_promote_args(name, "1")).code == 0
    assert not tracking.client().search_registered_models(f"name='{PREFIX + name}'")


# --- issue 14: many hosts, one registry ---------------------------------------------------


@pytest.fixture
def retrain_config(tmp_path: Path, tiny_base: Path) -> tuple[Path, str]:
    """A retrain config of its own model name; each "host" overrides output.dir and LMCTL_HOME."""
    name = _name("team-retrain")
    config = tiny_config_dict(tiny_base, tmp_path / "runs")
    config["output"]["run_name"] = "team"
    config["registry"]["name"] = name
    config["retrain"] = {"eval_data": str(ASSETS / "tiny_validation.jsonl")}
    path = tmp_path / "retrain.yaml"
    path.write_text(json.dumps(config))
    return path, name


def _host(tmp_path: Path, host: str, extra: dict[str, str] | None = None,
          sets: tuple[str, ...] = ()) -> tuple[list[str], dict[str, str]]:
    """The arguments and environment of `lmctl retrain` on one "machine": its own LMCTL_HOME and disk."""
    env = {**os.environ, "LMCTL_HOME": str(tmp_path / host / "home"), **(extra or {})}
    return ["--set", f"output.dir={tmp_path / host / 'runs'}", *(a for s in sets for a in ("--set", s)), "--json"], env


def _retrain(config: Path, tmp_path: Path, host: str, extra: dict[str, str] | None = None,
             sets: tuple[str, ...] = ()) -> subprocess.Popen[str]:
    args, env = _host(tmp_path, host, extra, sets)
    return subprocess.Popen([sys.executable, "-m", "lmctl", "retrain", str(config), *args], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def test_two_hosts_retrain_at_once_one_runs_the_other_exits_5(team: dict, retrain_config: tuple[Path, str],
                                                               tmp_path: Path) -> None:
    from lmctl import versions

    config, name = retrain_config
    procs = [_retrain(config, tmp_path, host) for host in ("host-a", "host-b")]
    outs = [p.communicate(timeout=900) for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 5], [err[-1500:] for _, err in outs]
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    busy = outs[loser][1]
    assert f"pid {procs[winner].pid} on " in busy and "last heartbeat" in busy and busy.count("\n") == 1
    assert outs[loser][0] == ""  # the second host did nothing
    assert json.loads(outs[winner][0])["result"] == "promoted"
    assert [v.version for v in versions.list_versions(name)] == ["1"]


def test_killed_on_host_a_resumed_on_host_b(cli, team: dict, retrain_config: tuple[Path, str], tmp_path: Path) -> None:
    """Host A is SIGKILLed after training (its lock stays, its heartbeat stops) and loses its
    disk; host B breaks the stale lock, resumes the run from the server (state and the uploaded
    checkpoint) and finishes with exactly one new version."""
    import signal
    import time

    from lmctl import versions

    config, name = retrain_config
    fast_stale = {"LMCTL_LOCK_STALE_S": "4"}
    host_a = _retrain(config, tmp_path, "host-a", {**fast_stale, "LMCTL_RETRAIN_CRASH_AFTER": "train"})
    out, err = host_a.communicate(timeout=900)
    assert host_a.returncode == -signal.SIGKILL and out == "", err[-2000:]
    shutil.rmtree(tmp_path / "host-a")  # a rescheduled pod: the old node's disk is gone
    # A's last heartbeat may be a moment old: within the stale limit the lock counts as held
    # (host B would exit 5 at once, as a live holder's rival must). Wait the limit out.
    time.sleep(float(fast_stale["LMCTL_LOCK_STALE_S"]) + 1)

    status = cli("retrain", "--status", name, "--json")  # from a third machine: this test's LMCTL_HOME
    assert status.code == 0, status.err
    assert status.json["running"] is True and f"pid {host_a.pid} on " in status.json["holder"]
    assert status.json["run"]["stage"] == "evaluate" and status.json["run"]["candidate_version"] is None

    args, env = _host(tmp_path, "host-b", fast_stale)
    resumed = run_subprocess("retrain", str(config), *args, env=env, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    result = json.loads(resumed.stdout)
    assert result["resumed"] is True and result["result"] == "promoted" and result["candidate_version"] == "1"
    assert {s["name"]: s["attempts"] for s in result["stages"]}["train"] == 1  # not trained again
    assert str(tmp_path / "host-b") in result["checkpoint"]  # fetched from the server's artifact store
    assert "breaking the server lock" in resumed.stderr
    assert [v.version for v in versions.list_versions(name)] == ["1"]
    after = cli("retrain", "--status", name, "--json").json
    assert after["running"] is False and after["run"]["stage"] == "done" and after["run"]["invocations"] == 2


def _uploaded_training_step(name: str) -> bool:
    """Whether a sealed training checkpoint of the model's retrain run is on the server."""
    from lmctl import tracking

    client = tracking.client()
    exp = client.get_experiment_by_name(f"lmctl-retrain/{name}")
    runs = client.search_runs([exp.experiment_id]) if exp else []
    return bool(runs) and any(
        f.path.endswith("lmctl.json")
        for d in client.list_artifacts(runs[0].info.run_id, "training/checkpoints") if d.is_dir
        for f in client.list_artifacts(runs[0].info.run_id, d.path))


def test_killed_mid_training_on_host_a_continues_on_host_b(cli, team: dict, retrain_config: tuple[Path, str],
                                                            tmp_path: Path) -> None:
    """Host A uploads each sealed checkpoint as it trains; SIGKILLed mid-training with its disk
    lost, the run continues on host B from the last uploaded checkpoint, not from step 0."""
    import time

    config, name = retrain_config
    sets = ("train.max_steps=30", "train.save_every=2", "train.eval_every=1000")
    fast_stale = {"LMCTL_LOCK_STALE_S": "4"}
    host_a = _retrain(config, tmp_path, "host-a", fast_stale, sets)
    deadline = time.monotonic() + 600
    while not _uploaded_training_step(name):
        assert host_a.poll() is None and time.monotonic() < deadline, host_a.communicate()[1][-2000:]
        time.sleep(0.5)
    host_a.kill()
    host_a.communicate()
    shutil.rmtree(tmp_path / "host-a")
    time.sleep(float(fast_stale["LMCTL_LOCK_STALE_S"]) + 1)  # until A's last heartbeat is stale

    args, env = _host(tmp_path, "host-b", fast_stale, sets)
    resumed = run_subprocess("retrain", str(config), *args, env=env, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    result = json.loads(resumed.stdout)
    assert result["resumed"] is True and result["result"] == "promoted"
    assert {s["name"]: s["attempts"] for s in result["stages"]}["train"] == 2
    training = cli("retrain", "--status", name, "--json").json["run"]["training"]
    assert "checkpoint-" in str(training["resumed_from"]) and training["steps"] == 30
    assert str(tmp_path / "host-b") in str(training["resumed_from"])


def _bare_versions(name: str, count: int, with_artifacts: bool = False) -> dict[str, str]:
    """Versions made with the MLflow client (alias bookkeeping reads no checkpoint), each on a
    run of its own (the server accepts only a source inside the run); returns version -> run id."""
    from lmctl import tracking

    client = tracking.client()
    client.create_registered_model(name)
    exp = tracking.experiment_id(client, "lmctl-registry")
    runs = {}
    for i in range(1, count + 1):
        run = client.create_run(exp)
        if with_artifacts:
            client.log_text(run.info.run_id, f"weights of v{i}", "checkpoint/adapter.txt")
        client.create_model_version(name, source=f"{run.info.artifact_uri}/checkpoint", run_id=run.info.run_id)
        runs[str(i)] = run.info.run_id
    return runs


def test_a_hundred_moves_with_rollbacks_keep_every_record(cli, team: dict) -> None:
    from lmctl import registry
    from lmctl import versions

    name = _name("team-audit")
    _bare_versions(name, 5)
    in_effect: list[str] = []
    moves = 0
    while moves < 100:
        version = str(moves % 5 + 1)
        if versions.alias_holder(name, "production") == version:
            version = str(int(version) % 5 + 1)
        registry.move_alias(name, "production", version, reason=f"move {moves}")
        in_effect.append(version)
        moves += 1
        if len(in_effect) % 4 == 0:
            back = registry.rollback(name)
            undone = in_effect.pop()
            assert (back.previous_version, back.version) == (undone, in_effect[-1])
            moves += 1
    history = cli("registry", "history", name, "--json").json["moves"]
    assert len(history) == moves >= 100
    assert [m["seq"] for m in history] == list(range(1, moves + 1))
    assert [m["previous_version"] for m in history[1:]] == [m["version"] for m in history[:-1]]
    assert cli("registry", "history", name, "--limit", "3", "--json").json["moves"] == history[-3:]
    assert versions.alias_holder(name, "production") == in_effect[-1]


def test_gc_on_the_server_keeps_protected_versions_and_records_deletions(cli, team: dict) -> None:
    from lmctl import registry
    from lmctl import versions

    name = _name("team-gc")
    runs = _bare_versions(name, 5, with_artifacts=True)
    registry.move_alias(name, "production", "1")
    registry.move_alias(name, "production", "2")
    plan = cli("registry", "gc", name, "--keep", "1", "--recent-moves", "1", "--json")
    # 2 holds production, the last record (1 -> 2) names 1, 5 is the newest: 3 and 4 go
    assert plan.code == 0 and plan.json["delete"] == ["3", "4"], plan.err
    assert plan.json["deleted"] == []
    done = cli("registry", "gc", name, "--keep", "1", "--recent-moves", "1", "--yes", "--json")
    assert done.code == 0 and done.json["deleted"] == ["3", "4"], done.err
    assert [v.version for v in versions.list_versions(name)] == ["1", "2", "5"]
    stored = {v: list(Path(team["artifacts"]).rglob(f"{run_id}/artifacts/checkpoint/adapter.txt"))
              for v, run_id in runs.items()}
    assert sorted(v for v, found in stored.items() if not found) == ["3", "4"]  # deleted through the server
    deletions = [m for m in cli("registry", "history", name, "--json").json["moves"] if m["action"] == "delete"]
    assert [m["version"] for m in deletions] == ["3", "4"]
