"""`lmctl retrain CONFIG`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from lmctl.cli.output import JsonOpt, TracebackOpt, emit
from lmctl.errors import PolicyError


def retrain(
    config: Annotated[Path, typer.Argument(help="YAML config file (its retrain section sets eval data, suites, gates).")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a field: section.key=value (repeatable).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Retrain even when the data is unchanged since production was trained.")] = False,
    json_out: JsonOpt = False,
    traceback: TracebackOpt = False,
) -> None:
    """Scheduled pipeline: train on new data, evaluate against production, register, promote if every gate passes."""
    from lmctl.config import load_config
    from lmctl.evaluate.compare import gate_table
    from lmctl.retrain import retrain as run_retrain

    cfg = load_config(config, set_ or [])
    result = run_retrain(cfg, config_path=config.resolve(), force=force)
    emit(result, json_out)
    if result.result == "not_promoted":
        if result.gates:
            sys.stderr.write(gate_table(result.gates) + "\n")
        raise PolicyError(f"candidate v{result.candidate_version} not promoted: {result.reason}",
                          hint=f"report: {result.report}")
