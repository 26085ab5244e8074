"""`lmctl data validate|prepare`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmctl.cli.help import Command
from lmctl.cli.output import JsonOpt, TracebackOpt, emit

app = typer.Typer(no_args_is_help=True)
cache_app = typer.Typer(no_args_is_help=True, help="The tokenization cache under LMCTL_HOME/cache/tokens.")
app.add_typer(cache_app, name="cache")
FormatOpt = Annotated[str, typer.Option("--format", help="auto, text, completion or chat.")]
TextFieldOpt = Annotated[str, typer.Option("--text-field", help="Column with the text (text format).")]


@app.command("validate", cls=Command)
def validate(
    source: Annotated[Path, typer.Argument(metavar="FILE|CONFIG", help="A data file, or a config (checks data.train and data.validation with the base model's tokenizer).")],
    validation: Annotated[Path | None, typer.Option(help="Held-out file, checked for overlap with FILE.")] = None,
    model: Annotated[str | None, typer.Option(help="Tokenizer for token-length stats (model dir or pulled name).")] = None,
    max_length: Annotated[int, typer.Option("--max-length", help="Truncation length for the truncation rate.")] = 512,
    text_field: TextFieldOpt = "text",
    fmt: FormatOpt = "auto",
    json_out: JsonOpt = False,
    traceback: TracebackOpt = False,
) -> None:
    """Rows, empty/duplicate rows, token lengths, truncation, overlap and PII of a data set."""
    from lmctl.config import load_config
    from lmctl.data.quality import validate as run_validate
    from lmctl.errors import BadInputError
    from lmctl.loading import load_tokenizer
    from lmctl.modelref import resolve_base

    num_proc = None  # a data file: all cores for a big one (lmctl.data.cache.default_num_proc)
    if source.suffix.lower() in (".yaml", ".yml"):
        cfg = load_config(source)
        if cfg.data.train is None:
            raise BadInputError(f"{source}: data.train is not set")
        source, validation, model = cfg.data.train, cfg.data.validation, model or cfg.model.base
        max_length, text_field, fmt = cfg.data.max_length, cfg.data.text_field, cfg.data.format
        num_proc = cfg.data.num_proc
    tokenizer = load_tokenizer(resolve_base(model)) if model else None
    emit(run_validate(source, validation, text_field, fmt, tokenizer, max_length, num_proc), json_out)


@app.command("prepare", cls=Command)
def prepare(
    source: Annotated[Path, typer.Argument(metavar="FILE", help="Raw data file.")],
    out: Annotated[Path, typer.Option(help="Output directory for train.jsonl, validation.jsonl, prepare.json.")],
    validation_share: Annotated[float, typer.Option("--validation-share", help="Share of rows held out (by content hash).")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of the hash split.")] = 0,
    no_redact: Annotated[bool, typer.Option("--no-redact", help="Keep PII (not recommended).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty output directory.")] = False,
    pii_regions: Annotated[str | None, typer.Option("--pii-regions", help="Comma-separated ISO regions whose national phone formats are redacted (default US,GB,DE,FR,IN,AU; +CC numbers always).")] = None,
    text_field: TextFieldOpt = "text",
    fmt: FormatOpt = "auto",
    json_out: JsonOpt = False,
    traceback: TracebackOpt = False,
) -> None:
    """Redact PII, remove exact duplicates and empty rows, split deterministically, fingerprint the result."""
    from lmctl.data.prepare import prepare as run_prepare
    from lmctl.pii import Detector

    detector = Detector(regions=tuple(pii_regions.split(","))) if pii_regions else None
    emit(run_prepare(source, out, text_field, fmt, validation_share, seed, not no_redact, force, detector), json_out)


@cache_app.command("list", cls=Command)
def cache_list(json_out: JsonOpt = False, traceback: TracebackOpt = False) -> None:
    """Every cached tokenization: its source, rows and size on disk."""
    from lmctl.data.cache import listing

    emit(listing(), json_out)


@cache_app.command("clear", cls=Command)
def cache_clear(json_out: JsonOpt = False, traceback: TracebackOpt = False) -> None:
    """Remove every cached tokenization (the next run tokenizes again)."""
    from lmctl.data.cache import clear

    emit(clear(), json_out)
