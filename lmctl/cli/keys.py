"""`lmctl keys add|hash`: API keys for `lmctl serve --api-keys-file`, kept only as hashes."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from lmctl.cli.fields import option, options_from
from lmctl.cli.help import Command
from lmctl.cli.output import JsonOpt, TracebackOpt, emit
from lmctl.serve.settings import KeyLimits

app = typer.Typer(no_args_is_help=True)
L = KeyLimits


@app.command("add", cls=Command)
def add(
    keys_file: Annotated[Path, typer.Argument(metavar="FILE", help="YAML keys file to add the key to (created if absent).")],
    name: Annotated[str, typer.Option("--name", help="The key's name, shown in logs and metrics (letters, digits, . _ -).")],
    requests_per_minute: int | None = option(L, "requests_per_minute", "--requests-per-minute"),
    tokens_per_minute: int | None = option(L, "tokens_per_minute", "--tokens-per-minute"),
    tokens_per_day: int | None = option(L, "tokens_per_day", "--tokens-per-day"),
    json_out: JsonOpt = False,
    traceback: TracebackOpt = False,
) -> None:
    """Make a new random key, write its sha256 and limits to FILE, and print the key: the only time it is shown."""
    from lmctl.serve.keys import add_key

    limits = options_from(KeyLimits, {"requests_per_minute": requests_per_minute, "tokens_per_minute": tokens_per_minute,
                                      "tokens_per_day": tokens_per_day})
    secret, entry = add_key(keys_file, name, limits)
    emit({"name": entry.name, "key": secret, "sha256": entry.sha256, "file": str(keys_file)}, json_out)


@app.command("hash", cls=Command)
def hash_(json_out: JsonOpt = False, traceback: TracebackOpt = False) -> None:
    """Read a key on stdin (never an argument: it would land in shell history) and print its sha256 for a keys file."""
    from lmctl.errors import BadInputError
    from lmctl.serve.keys import digest

    secret = sys.stdin.readline().strip()
    if not secret:
        raise BadInputError("no key on stdin", hint="printf %s \"$KEY\" | lmctl keys hash")
    emit({"sha256": digest(secret)}, json_out)
