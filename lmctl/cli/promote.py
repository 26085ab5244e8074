"""`lmctl promote NAME VERSION` and `lmctl rollback NAME`."""

from __future__ import annotations

from typing import Annotated

import typer

from lmctl.cli.output import JsonOpt, TracebackOpt, emit


def promote(
    name: Annotated[str, typer.Argument()],
    version: Annotated[str, typer.Argument()],
    alias: Annotated[str, typer.Option(help="Alias to move.")] = "production",
    reason: Annotated[str | None, typer.Option(help="Why, recorded in the audit history.")] = None,
    json_out: JsonOpt = False,
    traceback: TracebackOpt = False,
) -> None:
    """Point an alias (default production) at a version; the move is recorded."""
    from lmctl import registry

    emit(registry.move_alias(name, alias, version, reason=reason), json_out)


def rollback(
    name: Annotated[str, typer.Argument()],
    alias: Annotated[str, typer.Option(help="Alias to move back.")] = "production",
    json_out: JsonOpt = False,
    traceback: TracebackOpt = False,
) -> None:
    """Return an alias to the version it pointed at before its latest move."""
    from lmctl import registry

    emit(registry.rollback(name, alias), json_out)
