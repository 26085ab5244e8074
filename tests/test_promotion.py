"""The promotion policy: an alias with a holder moves only on a passing eval report about
this version against that holder, or with --force --reason (recorded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ASSETS

DATA = ASSETS / "tiny_validation.jsonl"


@pytest.fixture
def two_versions(cli, trained_checkpoint: Path) -> str:  # type: ignore[no-untyped-def]
    """Model "p" with v1 in production (first promotion, no report) and v2 registered."""
    for _ in range(2):
        assert cli("register", trained_checkpoint, "--name", "p").code == 0
    first = cli("promote", "p", "1", "--json")
    assert first.code == 0, first.err
    assert first.json["gated"] is False and first.json["why"] == "first promotion"
    return "p"


def _report(cli, tmp_path: Path, ref: str, baseline: str | None, max_regression: float | None, name: str) -> Path:  # type: ignore[no-untyped-def]
    path = tmp_path / name
    args = ["eval", ref, "--data", DATA, "--max-length", "32", "--report", path]
    if baseline:
        args += ["--baseline", baseline, "--max-ppl-regression", str(max_regression)]
    result = cli(*args)
    assert result.code == 0, result.err
    return path


def _variant(report: Path, name: str, change) -> Path:  # type: ignore[no-untyped-def]
    """The real report with one thing changed, as a report of another run would differ."""
    data = json.loads(report.read_text())
    change(data)
    path = report.with_name(name)
    path.write_text(json.dumps(data))
    return path


def _holder(cli) -> str:  # type: ignore[no-untyped-def]
    return cli("registry", "show", "p@production", "--json").json["version"]


def test_promotion_needs_a_passing_report_about_this_version_and_holder(cli, two_versions: str, tmp_path: Path) -> None:
    missing = cli("promote", "p", "2", "--json")
    assert missing.code == 3 and "needs an eval report" in missing.err
    assert missing.json["promoted"] is False and "needs an eval report" in missing.json["why"]
    assert missing.json["version"] == "2" and missing.json["gated"] is False
    assert "lmctl eval models:/p/2" in missing.err and "--force --reason" in missing.err
    assert "Traceback" not in missing.err and _holder(cli) == "1"

    passing = _report(cli, tmp_path, "models:/p/2", "models:/p@production", 5.0, "passing.json")
    data = json.loads(passing.read_text())
    assert data["registry"] == {"name": "p", "version": "2"} and len(data["manifest_sha256"]) == 64
    assert data["baseline"]["registry"] == {"name": "p", "version": "1"} and data["gates"][0]["passed"]

    def fail(d: dict) -> None:
        d["gates"][0].update(passed=False, value=12.5)

    refused = cli("promote", "p", "2", "--eval", _variant(passing, "failing.json", fail), "--json")
    assert refused.code == 3 and "1 gate(s) failed" in refused.err and "FAIL" in refused.err
    # a "no" is a result: with --json, stdout holds the promotion object saying what was refused
    assert refused.json["promoted"] is False and refused.json["previous_version"] == "1" and refused.json["gated"]
    assert "1 gate(s) failed" in refused.json["why"] and refused.json["gates"][0]["passed"] is False
    assert refused.json["at"] is None and refused.json["report"]["path"].endswith("failing.json")
    no_gates = _variant(passing, "nogates.json", lambda d: d.update(gates=[]))
    refused = cli("promote", "p", "2", "--eval", no_gates)
    assert refused.code == 3 and "no gates" in refused.err
    wrong_baseline = _variant(passing, "baseline.json", lambda d: d["baseline"]["registry"].update(version="2"))
    refused = cli("promote", "p", "2", "--eval", wrong_baseline)
    assert refused.code == 3 and "held by models:/p/1" in refused.err
    other_version = cli("promote", "p", "1", "--alias", "staging", "--eval", passing)
    assert other_version.code == 3 and "not models:/p/1" in other_version.err
    assert _holder(cli) == "1"

    accepted = cli("promote", "p", "2", "--eval", passing, "--reason", "better", "--json")
    assert accepted.code == 0, accepted.err
    assert accepted.json["promoted"] is True and accepted.json["gated"] is True and accepted.json["previous_version"] == "1"
    assert accepted.json["gates"] and all(g["passed"] for g in accepted.json["gates"])
    moves = cli("registry", "history", "p", "--json").json["moves"]
    assert moves[-1]["report"]["path"] == str(passing.resolve()) and len(moves[-1]["report"]["sha256"]) == 64
    assert moves[-1]["forced"] is False and moves[0]["report"] is None

    stale = cli("promote", "p", "1", "--eval", passing)  # the same report, now that v2 holds the alias
    assert stale.code == 3 and "not models:/p/1" in stale.err


def test_force_needs_a_reason_and_is_recorded(cli, two_versions: str) -> None:
    alone = cli("promote", "p", "2", "--force")
    assert alone.code == 2 and "--reason" in alone.err and _holder(cli) == "1"
    forced = cli("promote", "p", "2", "--force", "--reason", "hotfix for incident 42", "--json")
    assert forced.code == 0, forced.err
    assert forced.json["forced"] is True and forced.json["gated"] is False
    last = cli("registry", "history", "p", "--json").json["moves"][-1]
    assert last["forced"] is True and last["reason"] == "hotfix for incident 42" and last["version"] == "2"
    assert cli("promote", "p", "2", "--force", "--reason", "again").code == 2  # already there: nothing to move


def test_report_on_a_local_checkpoint_matches_by_manifest_hash(cli, trained_checkpoint: Path, tmp_path: Path) -> None:
    assert cli("register", trained_checkpoint, "--name", "q").code == 0
    report = _report(cli, tmp_path, str(trained_checkpoint), None, None, "local.json")
    sha = json.loads(report.read_text())["manifest_sha256"]
    assert sha == cli("registry", "show", "q/1", "--json").json["tags"]["lmctl.manifest_sha256"]
    first = cli("promote", "q", "1", "--eval", report, "--json")  # first promotion: a given report is still checked
    assert first.code == 0, first.err
    assert first.json["gated"] is True and first.json["why"].startswith("first promotion")
    not_a_report = tmp_path / "x.json"
    not_a_report.write_text('{"metrics": {}}')
    assert cli("promote", "q", "1", "--alias", "staging", "--eval", not_a_report).code == 2
