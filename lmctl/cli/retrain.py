"""`lmctl retrain CONFIG`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmctl.cli.output import JsonOpt, TracebackOpt, emit
from lmctl.errors import BadInputError


def retrain(
    config: Annotated[Path | None, typer.Argument(help="YAML config file (its retrain section sets eval data, suites, gates).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a field: section.key=value (repeatable).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Retrain even when the data is unchanged since production was trained.")] = False,
    status: Annotated[str | None, typer.Option("--status", metavar="NAME", help="Show the current or last retrain run of registered model NAME (from any host in team mode) and who holds its lock; runs nothing.")] = None,
    json_out: JsonOpt = False,
    traceback: TracebackOpt = False,
) -> None:
    """Scheduled pipeline: train on new data, evaluate against production, register, promote if every gate passes."""
    from lmctl.config import load_config
    from lmctl.retrain import retrain as run_retrain
    from lmctl.retrain import status as run_status

    if status is not None:
        if config is not None or set_ or force:
            raise BadInputError("--status NAME takes no CONFIG, --set or --force")
        emit(run_status(status), json_out)
        return
    if config is None:
        raise BadInputError("missing CONFIG", hint="lmctl retrain CONFIG, or lmctl retrain --status NAME")
    cfg = load_config(config, set_ or [])
    result = run_retrain(cfg, config_path=config.resolve(), force=force)
    emit(result, json_out)
    result.enforce()
