"""The validated inputs of one `lmctl retrain` invocation, checked before any lock or state is written."""

from __future__ import annotations

from pathlib import Path

from lmctl import versions
from lmctl.config import LmctlConfig
from lmctl.errors import BadInputError, ConfigError
from lmctl.retrain.stores import open_store


class RetrainContext:
    """The validated inputs of one invocation (checked before any lock or state is written)."""

    def __init__(self, cfg: LmctlConfig, config_path: Path | None, force: bool) -> None:
        from lmctl.evaluate.suites import load_suite

        r = cfg.retrain
        if not cfg.registry.name:
            raise ConfigError("retrain needs registry.name", hint="set registry.name in the config")
        if cfg.data.train is None or not cfg.data.train.is_file():
            raise BadInputError(f"data.train {cfg.data.train}: not a file", hint="point data.train at the training data")
        self.eval_data = r.eval_data or cfg.data.validation
        if self.eval_data is None or not self.eval_data.is_file():
            raise BadInputError(f"retrain eval data {self.eval_data}: not a file",
                                hint="set retrain.eval_data (or data.validation) to a fixed eval set")
        for key, path in (("drift_current", r.drift_current), ("drift_reference", r.drift_reference)):
            if path is not None and not path.is_file():
                raise BadInputError(f"retrain.{key} {path}: not a file")
        suite_names = {load_suite(p).name for p in r.suites}
        unknown = set(r.min_scores) - suite_names
        if unknown:
            raise ConfigError(f"retrain.min_scores names suites not in retrain.suites: {', '.join(sorted(unknown))}")
        self.name = versions.validate_name(cfg.registry.name)
        versions.validate_alias(r.candidate_alias)
        versions.validate_alias(r.production_alias)
        self.cfg, self.config_path, self.force = cfg, config_path, force
        self.store = open_store(self.name, r.state_dir)
