"""`lmctl serve MODEL_REF`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmctl.cli.output import TracebackOpt


def serve(
    model_ref: Annotated[str, typer.Argument(metavar="MODEL_REF", help="Checkpoint dir, model dir or models:/ reference.")],
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.")] = 8000,
    api_keys_file: Annotated[Path | None, typer.Option("--api-keys-file", help="File with one API key per line (else LMCTL_API_KEYS).")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Allow a non-loopback address without API keys.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Accepted for uniformity; the server logs to stderr.")] = False,
    traceback: TracebackOpt = False,
) -> None:
    """Serve an OpenAI-style /v1/completions API after verifying the checkpoint lock."""
    from lmctl.serve import serve as run_server

    run_server(model_ref, host=host, port=port, api_keys_file=api_keys_file, insecure=insecure)
