"""`lmctl retrain CONFIG`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmctl.cli.output import JsonOpt, TracebackOpt, emit


def retrain(
    config: Annotated[Path, typer.Argument(help="YAML config file (its retrain section sets eval data, suites, gates).")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a field: section.key=value (repeatable).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Retrain even when the data is unchanged since production was trained.")] = False,
    json_out: JsonOpt = False,
    traceback: TracebackOpt = False,
) -> None:
    """Scheduled pipeline: train on new data, evaluate against production, register, promote if every gate passes."""
    from lmctl.config import load_config
    from lmctl.retrain import retrain as run_retrain

    cfg = load_config(config, set_ or [])
    result = run_retrain(cfg, config_path=config.resolve(), force=force)
    emit(result, json_out)
    result.enforce()
