"""`lmctl config validate|show CONFIG`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmctl.cli.help import Command
from lmctl.cli.output import JsonOpt, TracebackOpt, emit

app = typer.Typer(no_args_is_help=True)
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a field: section.key=value (repeatable).")]


@app.command("validate", cls=Command)
def validate(
    config: Annotated[Path, typer.Argument(help="YAML config file.")],
    set_: SetOpt = None,
    json_out: JsonOpt = False,
    traceback: TracebackOpt = False,
) -> None:
    """Check a config; every problem is reported at once (exit 2)."""
    from lmctl.config import load_config

    load_config(config, set_ or [])
    emit({"config": str(config), "valid": True}, json_out)


@app.command("show", cls=Command)
def show(
    config: Annotated[Path, typer.Argument(help="YAML config file.")],
    set_: SetOpt = None,
    json_out: JsonOpt = False,
    traceback: TracebackOpt = False,
) -> None:
    """Print the resolved config (defaults filled, paths absolute, secrets redacted)."""
    from lmctl.config import config_dump, load_config

    emit(config_dump(load_config(config, set_ or [])), json_out)
