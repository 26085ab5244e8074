"""`lmctl train CONFIG`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmctl.cli.output import JsonOpt, TracebackOpt, emit
from lmctl.errors import BadInputError


def train(
    config: Annotated[Path, typer.Argument(help="YAML config file.")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a field: section.key=value (repeatable).")] = None,
    resume: Annotated[str, typer.Option(help="auto (newest Trainer checkpoint of this run), never (archive it, start fresh), or a Trainer checkpoint PATH.")] = "auto",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate config, model and data; print the plan; train nothing.")] = False,
    json_out: JsonOpt = False,
    traceback: TracebackOpt = False,
) -> None:
    """LoRA fine-tune the configured base model; checkpoints go under the run directory."""
    from lmctl.config import load_config
    from lmctl.train import train as run_training

    if resume not in ("auto", "never") and not Path(resume).exists():
        raise BadInputError(f"--resume {resume!r}: expected auto, never or an existing path")
    from lmctl.train import is_primary

    cfg = load_config(config, set_ or [])
    result = run_training(cfg, resume=resume, dry_run=dry_run)
    if is_primary():  # under torchrun only rank 0 speaks: stdout holds one JSON object
        emit(result, json_out)
