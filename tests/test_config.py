"""Config loading: every shipped config validates; bad files fail with exit 2 and a location."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmctl.config import LmctlConfig, config_dump, load_config
from lmctl.errors import ConfigError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))  # configs/evals/ holds suites


def test_configs_dir_is_not_empty() -> None:
    assert CONFIGS, "configs/ must ship at least one config"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, LmctlConfig)
    assert cfg.model.base


def test_every_field_has_help_text() -> None:
    for section_name, section in LmctlConfig.model_fields.items():
        assert section.description, section_name
        for name, field in section.annotation.model_fields.items():  # type: ignore[union-attr]
            assert field.description, f"{section_name}.{name} has no help text"


def test_defaults_match_design() -> None:
    cfg = load_config(None)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules) == (8, 16, 0.05, "auto")
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.grad_accum, cfg.train.lr) == (1, 8, 1, 2.0e-4)
    assert (cfg.data.text_field, cfg.data.max_length, cfg.model.trust_remote_code) == ("text", 512, False)


def test_set_overrides_are_typed_and_validated(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.001\n")
    cfg = load_config(path, ["train.lr=5e-5", "lora.target_modules=[q_proj, v_proj]", "train.max_steps=3"])
    assert cfg.train.lr == 5e-5 and cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.train.max_steps == 3
    with pytest.raises(ConfigError, match="train.nope: unknown key"):
        load_config(path, ["train.nope=1"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(path, ["lr=1"])


def test_all_problems_reported_at_once_with_lines(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  base: x\ntrain:\n  lr: -1\n  batch_size: zero\n  colour: red\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    problems = info.value.problems
    assert len(problems) == 3
    assert any(p.startswith(f"{path}:4: train.lr") for p in problems)
    assert any(p.startswith(f"{path}:5: train.batch_size") for p in problems)
    assert any(p == f"{path}:6: train.colour: unknown key" for p in problems)


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "c.yaml"
    path.write_text("data:\n  train: data/train.jsonl\noutput:\n  dir: runs\n")
    cfg = load_config(path)
    assert cfg.data.train == tmp_path / "sub" / "data" / "train.jsonl"
    assert cfg.output.dir == tmp_path / "sub" / "runs"
    assert cfg.output.run_name == "c"


def test_show_redacts_secrets(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("registry:\n  tracking_uri: postgresql://lmctl:hunter2@db:5432/mlflow\n")
    dumped = config_dump(load_config(path))
    assert "hunter2" not in str(dumped)
    assert dumped["registry"]["tracking_uri"] == "postgresql://lmctl:***@db:5432/mlflow"
