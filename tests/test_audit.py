"""The audit trail on the embedded store: one MLflow run per alias move, unbounded, paged,
rollbacks computed from all of it, and histories of the old 30-entry tag read and migrated.

Versions are created with the MLflow client (no artifacts): alias bookkeeping does not
look at a checkpoint, and training one per test would prove nothing more here.
"""

from __future__ import annotations

import json
import socket

import pytest

from lmctl import registry
from lmctl import tracking, versions
from lmctl.registry import audit


@pytest.fixture
def model() -> str:
    """Model "a" with versions 1-4, registered as complete (no lmctl.status tag)."""
    client = tracking.client()
    client.create_registered_model("a")
    for _ in range(4):
        client.create_model_version("a", source="file:///nonexistent")
    return "a"


def _holder(name: str) -> str | None:
    return versions.alias_holder(name, "production")


def test_long_history_every_rollback_is_right(cli, model: str) -> None:
    """45 moves (more than the old tag's 30) with rollbacks in between: each rollback returns
    production to the version that held it before the promotion it undoes."""
    in_effect: list[str] = []  # the spec: promotions push the previous holder, rollbacks return to it
    moves = 0
    for i in range(30):
        version = str(i % 4 + 1)
        if _holder(model) == version:
            version = str((i + 1) % 4 + 1)
        registry.move_alias(model, "production", version, reason=f"step {i}")
        in_effect.append(version)
        moves += 1
        if i % 3 == 2:  # every third promotion is undone, sometimes twice in a row
            for _ in range(1 if i % 2 else 2):
                back = cli("rollback", model, "--json")
                assert back.code == 0, back.err
                undone = in_effect.pop()
                assert back.json["previous_version"] == undone
                assert back.json["version"] == in_effect[-1] == _holder(model)
                moves += 1
    history = cli("registry", "history", model, "--json").json["moves"]
    assert len(history) == moves > 30
    assert [m["seq"] for m in history] == list(range(1, moves + 1))
    assert [m["previous_version"] for m in history[1:]] == [m["version"] for m in history[:-1]]
    while len(in_effect) > 1:  # walk all the way back, then there is nothing earlier
        assert cli("rollback", model, "--json").json["version"] == in_effect[-2]
        in_effect.pop()
    last = cli("rollback", model)
    assert last.code == 2 and "no earlier version" in last.err


def test_history_pages_and_filters(cli, model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit, "PAGE", 4)  # many pages (search_runs page_token) from few records
    for i in range(9):
        registry.move_alias(model, "production" if i % 3 else "candidate", str(i % 4 + 1), reason=str(i))
    everything = cli("registry", "history", model, "--json").json["moves"]
    assert [m["reason"] for m in everything] == [str(i) for i in range(9)]
    newest = cli("registry", "history", model, "--limit", "5", "--json").json["moves"]
    assert newest == everything[-5:]
    candidate = cli("registry", "history", model, "--alias", "candidate", "--json").json["moves"]
    assert [m["reason"] for m in candidate] == ["0", "3", "6"]
    assert cli("registry", "history", model, "--alias", "candidate", "--limit", "2", "--json").json["moves"] == candidate[1:]
    assert cli("registry", "history", model, "--limit", "0").code == 2


def test_who_is_recorded(cli, model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("LMCTL_USER", "USER", "LOGNAME", *(k for k, _ in audit.CI_ENV)):
        monkeypatch.delenv(key, raising=False)
    registry.move_alias(model, "production", "1")
    monkeypatch.setenv("LOGNAME", "cron")
    monkeypatch.setenv("CI_JOB_ID", "777")
    registry.move_alias(model, "production", "2")
    monkeypatch.setenv("LMCTL_USER", "alice")
    monkeypatch.setenv("GITHUB_RUN_ID", "4242")
    registry.move_alias(model, "production", "3")
    moves = cli("registry", "history", model, "--json").json["moves"]
    import os

    assert [m["user"] for m in moves] == [f"uid{os.getuid()}@{socket.gethostname()}", "cron", "alice"]
    assert [m["ci_job"] for m in moves] == [None, "gitlab:777", "github:4242"]
    assert {m["host"] for m in moves} == {socket.gethostname()}


def test_legacy_tag_history_is_read_then_migrated(cli, model: str) -> None:
    """A registry written by lmctl before the audit trail: 30 capped entries that start with a
    rollback (its promotion fell off the cap), the case that crashed with IndexError."""
    entries = [{"name": model, "alias": "production", "version": "1", "previous_version": "2",
                "at": "2026-01-01T00:00:00+00:00", "user": "old", "action": "rollback"}]
    for i in range(29):
        previous, version = entries[-1]["version"], str((i + 1) % 3 + 2)
        entries.append({"name": model, "alias": "production", "version": version, "previous_version": previous,
                        "at": f"2026-01-02T00:00:{i:02d}+00:00", "user": "old", "action": "promote",
                        "reason": None, "report": None, "forced": False})
    client = tracking.client()
    client.set_registered_model_tag(model, audit.LEGACY_TAG, json.dumps(entries))
    client.set_registered_model_alias(model, "production", entries[-1]["version"])

    before = cli("registry", "history", model, "--json").json["moves"]
    assert [(m["version"], m["action"]) for m in before] == [(e["version"], e["action"]) for e in entries]
    back = cli("rollback", model, "--json")  # the first write migrates, then moves
    assert back.code == 0, back.err
    assert back.json["version"] == entries[-2]["version"] and back.json["seq"] == 31
    after = cli("registry", "history", model, "--json").json["moves"]
    assert after[:30] == [{**m, "seq": i + 1} for i, m in enumerate(before)] and len(after) == 31
    assert audit.LEGACY_TAG not in client.get_registered_model(model).tags


def test_a_failed_move_leaves_no_record(cli, model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    registry.move_alias(model, "production", "1")

    def refuse(*_: object) -> None:
        raise MlflowException("the server said no")

    with monkeypatch.context() as patched:
        patched.setattr(MlflowClient, "set_registered_model_alias", refuse)
        with pytest.raises(MlflowException):
            registry.move_alias(model, "production", "2")
    registry.move_alias(model, "production", "3")
    moves = registry.alias_history(model)
    assert [(m.version, m.seq) for m in moves] == [("1", 1), ("3", 3)]  # seq 2 is the FAILED record


def test_gc_keeps_protected_versions_and_records_deletions(cli, lmctl_home) -> None:  # type: ignore[no-untyped-def]
    """8 versions, each with its registration run and artifacts. Protected: the newest 2 (7, 8),
    alias holders (production 2, candidate 7), versions named by the last 2 records (3, 2, 7)
    and the candidate of an unfinished retrain (5). So 1, 4 and 6 go."""
    from pathlib import Path
    from urllib.parse import urlparse

    from lmctl.retrain.state import RetrainState, RunStore

    client = tracking.client()
    client.create_registered_model("g")
    exp = tracking.experiment_id(client, "lmctl-registry")
    artifact_dirs = {}
    for i in range(1, 9):
        run = client.create_run(exp)
        client.log_text(run.info.run_id, f"weights of v{i}", "checkpoint/adapter.txt")
        client.create_model_version("g", source=f"{run.info.artifact_uri}/checkpoint", run_id=run.info.run_id)
        artifact_dirs[str(i)] = Path(urlparse(run.info.artifact_uri).path)
    for version in ("1", "3", "2"):
        registry.move_alias("g", "production", version)
    registry.move_alias("g", "candidate", "7")
    RunStore(lmctl_home / "retrain" / "g").save(RetrainState(
        run_id="r1", name="g", config=None, force=False, started_at="now", stage="promote", candidate_version="5"))

    plan = cli("registry", "gc", "g", "--keep", "2", "--recent-moves", "2", "--json")
    assert plan.code == 0, plan.err
    assert plan.json["dry_run"] is True and plan.json["delete"] == ["1", "4", "6"] and plan.json["deleted"] == []
    kept = {k["version"]: k["why"] for k in plan.json["kept"]}
    assert sorted(kept, key=int) == ["2", "3", "5", "7", "8"]
    assert kept["2"] == "holds production" and "unfinished retrain run r1" in kept["5"]
    assert len(versions.list_versions("g")) == 8 and all(d.is_dir() for d in artifact_dirs.values())
    # --keep 0: age protects nothing, so the newest (8) goes too; aliases and the rest still protect
    zero = cli("registry", "gc", "g", "--keep", "0", "--recent-moves", "2", "--json")
    assert zero.code == 0, zero.err
    assert zero.json["delete"] == ["1", "4", "6", "8"] and sorted(k["version"] for k in zero.json["kept"]) == ["2", "3", "5", "7"]
    assert cli("registry", "gc", "g", "--keep", "-1").code == 2

    done = cli("registry", "gc", "g", "--keep", "2", "--recent-moves", "2", "--yes", "--json")
    assert done.code == 0, done.err
    assert done.json["deleted"] == ["1", "4", "6"]
    assert [v.version for v in versions.list_versions("g")] == ["2", "3", "5", "7", "8"]
    assert sorted(v for v, d in artifact_dirs.items() if not d.exists()) == ["1", "4", "6"]
    deletions = [m for m in registry.alias_history("g") if m.action == "delete"]
    assert [(m.version, m.alias, m.reason) for m in deletions] == [(v, None, "registry gc --keep 2") for v in "146"]
    assert cli("rollback", "g", "--json").json["version"] == "3"
    gone = cli("rollback", "g")  # the next target, v1, was deleted: a clear refusal, not a crash
    assert gone.code == 2 and "no version 1" in gone.err
