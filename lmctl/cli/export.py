"""`lmctl export MODEL_REF --out DIR [--merge]`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmctl.cli.output import JsonOpt, TracebackOpt, emit


def export(
    model_ref: Annotated[str, typer.Argument(metavar="MODEL_REF", help="Checkpoint dir or models:/ reference.")],
    out: Annotated[Path, typer.Option(help="Output directory.")],
    merge: Annotated[bool, typer.Option("--merge", help="Merge the adapter into the base weights (checked for equivalence).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty output directory.")] = False,
    json_out: JsonOpt = False,
    traceback: TracebackOpt = False,
) -> None:
    """Export a verified checkpoint, as is or merged into a plain Hugging Face model."""
    from lmctl.deploy.export import export as run_export

    emit(run_export(model_ref, out, merge=merge, force=force), json_out)
