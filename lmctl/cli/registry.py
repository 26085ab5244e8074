"""`lmctl register` and `lmctl registry list|show|verify|history`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmctl.cli.help import Command
from lmctl.cli.output import JsonOpt, TracebackOpt, emit
from lmctl.errors import BadInputError

app = typer.Typer(no_args_is_help=True)


def _parse_spec(spec: str) -> tuple[str, str | None]:
    """NAME, NAME/VERSION or NAME@ALIAS (with or without models:/) -> (name, version or None)."""
    from lmctl import versions
    from lmctl.modelref import parse_registry_ref

    parsed = parse_registry_ref(spec, bare=True)
    if parsed is None:
        raise BadInputError(f"{spec!r}: expected NAME, NAME/VERSION or NAME@ALIAS")
    version = parsed.version or (versions.version_for_alias(parsed.name, parsed.alias) if parsed.alias else None)
    return parsed.name, version


def register(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint directory (holds lmctl.json).")],
    name: Annotated[str, typer.Option("--name", help="Registered model name.")],
    alias: Annotated[str | None, typer.Option(help="Alias to point at the new version, e.g. candidate.")] = None,
    eval_report: Annotated[Path | None, typer.Option("--eval", help="Eval report JSON whose metrics become tags and go into the model card.")] = None,
    description: Annotated[str | None, typer.Option(help="Intended use, written into the generated model card (README.md).")] = None,
    json_out: JsonOpt = False,
    traceback: TracebackOpt = False,
) -> None:
    """Create a new model version from a verified checkpoint (tokenizer checked against the base; model card generated)."""
    from lmctl.registry.register import register as do_register

    emit(do_register(checkpoint, name, alias=alias, eval_report=eval_report, description=description), json_out)


@app.command("list", cls=Command)
def list_(
    name: Annotated[str | None, typer.Argument(help="Only this model.")] = None,
    json_out: JsonOpt = False,
    traceback: TracebackOpt = False,
) -> None:
    """List registered model versions with their aliases."""
    from lmctl.versions import list_versions

    emit({"versions": [v.model_dump(exclude={"tags"}) for v in list_versions(name)]}, json_out)


@app.command("show", cls=Command)
def show(
    spec: Annotated[str, typer.Argument(metavar="NAME[@ALIAS|/VERSION]")],
    json_out: JsonOpt = False,
    traceback: TracebackOpt = False,
) -> None:
    """Show one version (default: the newest) with its tags."""
    from lmctl.versions import get_version, list_versions

    name, version = _parse_spec(spec)
    if version is None:
        found = list_versions(name)
        if not found:
            raise BadInputError(f"registry has no model {name!r}")
        version = found[-1].version
    emit(get_version(name, version), json_out)


@app.command("verify", cls=Command)
def verify(
    model_ref: Annotated[str, typer.Argument(metavar="MODEL_REF")],
    json_out: JsonOpt = False,
    traceback: TracebackOpt = False,
) -> None:
    """Re-hash every artifact against lmctl.json (and the registry's lock tags and model card hash); exit 4 on mismatch."""
    from lmctl import tracking, versions
    from lmctl.modelref import resolve_checkpoint
    from lmctl.registry import model_card

    verified = resolve_checkpoint(model_ref, "nothing to verify")
    card = None
    if verified.registry_name and verified.registry_version:
        info = versions.get_version(verified.registry_name, verified.registry_version)
        card = model_card.verify(info.tags, tracking.tracking_uri())
    emit({"ref": model_ref, "verified": True, "files": len(verified.manifest.files),
          "tokenizer_fingerprint": verified.manifest.tokenizer.fingerprint, "model_card": card}, json_out)


@app.command("history", cls=Command)
def history(
    name: Annotated[str, typer.Argument()],
    alias: Annotated[str | None, typer.Option(help="Only moves of this alias.")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Only the newest N records (default: all of them).")] = None,
    json_out: JsonOpt = False,
    traceback: TracebackOpt = False,
) -> None:
    """The audit trail, oldest first: every alias move (when, who, host, CI job, from, to, why, the gating
    eval report, forced) and every version `registry gc` deleted."""
    from lmctl import registry

    emit({"moves": [m.model_dump() for m in registry.alias_history(name, alias, limit)]}, json_out)


@app.command("gc", cls=Command)
def gc(
    name: Annotated[str, typer.Argument()],
    keep: Annotated[int, typer.Option("--keep", min=0, help="Keep the newest N versions (older ones go unless protected; 0: age protects none, alias holders are still kept).")],
    recent_moves: Annotated[int, typer.Option("--recent-moves", min=0, help="Also keep every version named by the last K audit records (rollback targets).")] = 20,
    yes: Annotated[bool, typer.Option("--yes", help="Delete; without it, only show the plan (dry run).")] = False,
    json_out: JsonOpt = False,
    traceback: TracebackOpt = False,
) -> None:
    """Delete old versions and their artifacts; never one an alias holds or recently held, or an unfinished retrain uses."""
    from lmctl.registry.gc import gc as run_gc
    from lmctl.retrain.stores import versions_in_use

    emit(run_gc(name, keep, in_use=versions_in_use, recent_moves=recent_moves, yes=yes), json_out)


@app.command("diff", cls=Command)
def diff(
    ref_a: Annotated[str, typer.Argument(metavar="REF_A")],
    ref_b: Annotated[str, typer.Argument(metavar="REF_B")],
    json_out: JsonOpt = False,
    traceback: TracebackOpt = False,
) -> None:
    """Config, base model, data, tokenizer and metric differences between two checkpoints or versions."""
    from lmctl.registry.diff import diff as run_diff

    emit(run_diff(ref_a, ref_b), json_out)
