"""`lmctl promote NAME VERSION` and `lmctl rollback NAME`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmctl.cli.output import JsonOpt, TracebackOpt, emit


def promote(
    name: Annotated[str, typer.Argument()],
    version: Annotated[str, typer.Argument()],
    alias: Annotated[str | None, typer.Option(help="Alias to move (default: production).", show_default=False)] = None,
    eval_report: Annotated[Path | None, typer.Option("--eval", metavar="REPORT", help="Eval report of this version against the alias's current holder (lmctl eval --baseline ... --report); every gate must pass.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Promote without a passing report; needs --reason, recorded as forced.")] = False,
    reason: Annotated[str | None, typer.Option(help="Why, recorded in the audit history.")] = None,
    json_out: JsonOpt = False,
    traceback: TracebackOpt = False,
) -> None:
    """Point an alias (default production) at a version when its eval report's gates pass; the move is recorded."""
    from lmctl.config import PRODUCTION_ALIAS
    from lmctl.registry.promotion import promote as do_promote

    emit(do_promote(name, version, alias=alias or PRODUCTION_ALIAS, report_path=eval_report, force=force, reason=reason),
         json_out)


def rollback(
    name: Annotated[str, typer.Argument()],
    alias: Annotated[str | None, typer.Option(help="Alias to move back (default: production).", show_default=False)] = None,
    json_out: JsonOpt = False,
    traceback: TracebackOpt = False,
) -> None:
    """Return an alias to the version it pointed at before its latest move."""
    from lmctl import registry
    from lmctl.config import PRODUCTION_ALIAS

    emit(registry.rollback(name, alias or PRODUCTION_ALIAS), json_out)
