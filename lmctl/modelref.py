"""Turn what a user typed (a base model name or a MODEL_REF) into a local directory.

MODEL_REF forms (docs/commands.md, "MODEL_REF"): a local checkpoint or model directory, `models:/NAME/VERSION`,
`models:/NAME@ALIAS`, or a hub id (only where a hub can be reached).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from lmctl.checkpoint import is_checkpoint
from lmctl.errors import ModelRefError

_REGISTRY_RE = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w.-]+))$")
_HUB_ID_RE = re.compile(r"^[\w.-]+/[\w.-]+$")


class ResolvedRef(BaseModel):
    """A MODEL_REF made local. `kind` says how to load it."""

    ref: str
    kind: Literal["checkpoint", "model", "base"]
    path: str
    registry_name: str | None = None
    registry_version: str | None = None


def resolve_base(base: str) -> str:
    """A base model as a loadable string: a local directory, a pulled catalog model, or a hub id."""
    from lmctl.models import CATALOG, pulled_path

    path = Path(base).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelRefError(f"{path}: not a model directory (no config.json)")
        return str(path.resolve())
    if base in CATALOG:
        pulled = pulled_path(base)
        if pulled is None:
            raise ModelRefError(f"base model {base!r} is not pulled yet", hint=f"run `lmctl models pull {base}`")
        return str(pulled)
    if _HUB_ID_RE.match(base) and not base.startswith((".", "/")):
        return base
    raise ModelRefError(f"model {base!r} does not exist", hint="give a model directory, a pulled name or a hub id")


def portable_base_id(base: str, resolved: str) -> str:
    """How a checkpoint names its base: catalog names and hub ids as given (they resolve on
    any machine), local directories as absolute paths (they resolve from any working dir)."""
    from lmctl.models import CATALOG

    return base if base in CATALOG or not Path(resolved).is_dir() else resolved


def resolve(ref: str) -> ResolvedRef:
    """Resolve a MODEL_REF; raise ModelRefError (exit 2) when it names nothing."""
    match = _REGISTRY_RE.match(ref)
    if match:
        from lmctl import registry

        name, version = match["name"], match["version"]
        if version is None:
            version = registry.version_for_alias(name, match["alias"])
        path = registry.download_version(name, version)
        return ResolvedRef(ref=ref, kind="checkpoint", path=str(path), registry_name=name, registry_version=version)
    if ref.startswith("models:"):
        raise ModelRefError(f"malformed registry reference {ref!r}", hint="use models:/NAME/VERSION or models:/NAME@ALIAS")
    path = Path(ref).expanduser()
    if path.is_dir():
        kind: Literal["checkpoint", "model"] = "checkpoint" if is_checkpoint(path) else "model"
        if kind == "model" and not (path / "config.json").is_file():
            raise ModelRefError(f"{path}: neither an lmctl checkpoint (no lmctl.json) nor a model directory")
        return ResolvedRef(ref=ref, kind=kind, path=str(path.resolve()))
    return ResolvedRef(ref=ref, kind="base", path=resolve_base(ref))
