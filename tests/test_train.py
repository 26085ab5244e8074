"""Training inputs are validated before anything is written; a held run lock means exit 5."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from filelock import FileLock


def test_dry_run_validates_and_writes_nothing(cli, tiny_config: Path, tmp_path: Path) -> None:
    result = cli("train", tiny_config, "--dry-run", "--json")
    assert result.code == 0, result.err
    plan = result.json
    assert plan["train_rows"] == 48 and plan["validation_rows"] == 8 and plan["max_steps"] == 6
    assert not (tmp_path / "runs").exists()


def test_busy_run_exits_5(cli, tiny_config: Path, tmp_path: Path) -> None:
    (tmp_path / "runs").mkdir()
    with FileLock(str(tmp_path / "runs" / ".tiny.lock")):
        result = cli("train", tiny_config)
    assert result.code == 5 and "another process" in result.err


def test_bad_data_is_named(cli, tiny_config: Path, tmp_path: Path) -> None:
    missing = tmp_path / "missing.jsonl"
    result = cli("train", tiny_config, "--set", f"data.train={missing}")
    assert result.code == 2 and str(missing) in result.err
    result = cli("train", tiny_config, "--set", "data.text_field=body")
    assert result.code == 2 and "no field 'body'" in result.err
    unsupported = tmp_path / "data.xml"
    unsupported.write_text("<x/>")
    result = cli("train", tiny_config, "--set", f"data.train={unsupported}")
    assert result.code == 2 and "unsupported data format" in result.err
    assert not (tmp_path / "runs").exists()


def test_remote_code_is_refused_unless_trusted(cli, tiny_config: Path, tiny_base: Path, tmp_path: Path) -> None:
    custom = tmp_path / "custom-model"
    shutil.copytree(tiny_base, custom)
    config = json.loads((custom / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (custom / "config.json").write_text(json.dumps(config))
    result = cli("train", tiny_config, "--set", f"model.base={custom}", "--dry-run")
    assert result.code == 2 and "refusing to run it" in result.err


def test_unknown_base_model_is_bad_input(cli, tiny_config: Path) -> None:
    result = cli("train", tiny_config, "--set", "model.base=smollm2-135m", "--dry-run")
    assert result.code == 2 and "lmctl models pull smollm2-135m" in result.err
    result = cli("train", tiny_config, "--set", "model.base=./nowhere", "--dry-run")
    assert result.code == 2


def test_resume_auto_continues_from_the_trainer_checkpoint(cli, tiny_config: Path) -> None:
    first = cli("train", tiny_config, "--set", "train.max_steps=3", "--json")
    assert first.code == 0, first.err
    second = cli("train", tiny_config, "--set", "train.max_steps=6", "--json")
    assert second.code == 0, second.err
    assert second.json["resumed_from"].endswith("checkpoint-3") and second.json["steps"] == 6
    fresh = cli("train", tiny_config, "--set", "train.max_steps=3", "--resume", "never", "--json")
    assert fresh.code == 0 and fresh.json["resumed_from"] is None
    archived = [p for p in Path(fresh.json["run_dir"]).parent.iterdir() if p.name.startswith("tiny.")]
    assert len(archived) == 1 and (archived[0] / "checkpoints" / "step-000006" / "lmctl.json").is_file()
