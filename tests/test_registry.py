"""Registry rules that need no trained model: names, aliases, rollback bookkeeping."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmctl import registry
from lmctl import tracking, versions
from lmctl.errors import BadInputError, ModelRefError


@pytest.mark.parametrize("name", ["", "../etc", "a/b", "a" * 101, "..", "-x"])
def test_bad_model_names_are_refused(name: str) -> None:
    with pytest.raises(BadInputError):
        versions.validate_name(name)


@pytest.mark.parametrize("alias", ["", "v3", "1abc", "has space", "a/b"])
def test_bad_aliases_are_refused(alias: str) -> None:
    with pytest.raises(BadInputError):
        versions.validate_alias(alias)


def test_tracking_uri_is_absolute_under_home(lmctl_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert tracking.tracking_uri() == f"sqlite:///{lmctl_home.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///rel.db")
    assert tracking.tracking_uri() == f"sqlite:///{Path('rel.db').resolve()}"


def test_unknown_versions_and_aliases_are_bad_refs() -> None:
    with pytest.raises(ModelRefError):
        versions.get_version("nothing", "1")
    with pytest.raises(ModelRefError):
        versions.version_for_alias("nothing", "production")
    with pytest.raises(ModelRefError):
        registry.alias_history("nothing")


def test_promote_and_rollback_are_recorded(cli, trained_checkpoint: Path) -> None:
    for _ in range(2):
        assert cli("register", trained_checkpoint, "--name", "m", "--json").code == 0
    assert cli("rollback", "m").code == 2  # nothing to roll back to yet
    assert cli("promote", "m", "1", "--reason", "first").code == 0  # first promotion: no report needed
    # the gates are tests/test_promotion.py's subject; here the bookkeeping of forced moves
    assert cli("promote", "m", "2", "--force", "--reason", "better").code == 0
    back = cli("rollback", "m", "--json")
    assert back.code == 0 and back.json["version"] == "1" and back.json["previous_version"] == "2"
    moves = cli("registry", "history", "m", "--json").json["moves"]
    assert [(m["previous_version"], m["version"]) for m in moves] == [(None, "1"), ("1", "2"), ("2", "1")]
    assert moves[1]["reason"] == "better" and moves[2]["reason"].startswith("rollback")
    assert cli("promote", "m", "9").code == 2
    assert cli("registry", "show", "m@production", "--json").json["version"] == "1"
    assert cli("rollback", "m").code == 2  # back at the first promotion: nothing earlier


def test_repeated_rollbacks_walk_back_instead_of_toggling(cli, trained_checkpoint: Path) -> None:
    for _ in range(3):
        assert cli("register", trained_checkpoint, "--name", "w").code == 0
    assert cli("promote", "w", "1").code == 0
    for version in ("2", "3"):
        assert cli("promote", "w", version, "--force", "--reason", "test").code == 0
    assert cli("rollback", "w", "--json").json["version"] == "2"
    assert cli("rollback", "w", "--json").json["version"] == "1"
    assert cli("promote", "w", "3", "--force", "--reason", "test").code == 0
    assert cli("rollback", "w", "--json").json["version"] == "1"


def test_registry_diff_names_what_changed(cli, trained_checkpoint: Path, tiny_config: Path, tmp_path: Path) -> None:
    second = cli("train", tiny_config, "--set", "train.max_steps=2", "--set", "train.save_every=2",
                 "--set", "lora.r=8", "--set", "output.run_name=other", "--json")
    assert second.code == 0, second.err
    a, b = str(trained_checkpoint), second.json["checkpoint"]
    same = cli("registry", "diff", a, a, "--json").json
    assert same["identical"] is True
    result = cli("registry", "diff", a, b, "--json").json
    keys = {c["key"]: (c["a"], c["b"]) for c in result["config"]}
    assert keys["lora.r"] == (4, 8) and keys["output.run_name"] == ("tiny", "other")
    assert result["tokenizer"] == [] and result["base_model"] == [] and result["identical"] is False
    assert cli("register", a, "--name", "d").code == 0
    data = Path(__file__).parent / "assets" / "tiny_validation.jsonl"
    assert cli("eval", "models:/d/1", "--data", data, "--max-length", "32", "--log-to-registry").code == 0
    with_metrics = cli("registry", "diff", "models:/d/1", b, "--json").json
    assert {c["key"] for c in with_metrics["metrics"]} >= {"perplexity", "bits_per_byte"}
