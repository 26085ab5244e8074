"""Turn what a user typed (a base model name or a MODEL_REF) into a local directory.

MODEL_REF forms (docs/commands.md, "MODEL_REF"): a local checkpoint or model directory, `models:/NAME/VERSION`,
`models:/NAME@ALIAS`, or a hub id (only where a hub can be reached).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from lmctl import checkpoint
from lmctl.checkpoint import is_checkpoint
from lmctl.errors import BadInputError, ModelRefError

# The one grammar of registry references: [models:/]NAME[/VERSION|@ALIAS]. A MODEL_REF needs the
# scheme and a version or alias; `lmctl registry show` also takes a bare NAME (its newest version).
_REGISTRY_RE = re.compile(r"^(?P<scheme>models:/)?(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w.-]+))?$")
_HUB_ID_RE = re.compile(r"^[\w.-]+/[\w.-]+$")


class RegistrySpec(BaseModel):
    """A parsed registry reference: a version, an alias, or (bare NAME) neither."""

    name: str
    version: str | None = None
    alias: str | None = None


def parse_registry_ref(ref: str, bare: bool = False) -> RegistrySpec | None:
    """`models:/NAME/VERSION` or `models:/NAME@ALIAS` parsed, else None; with `bare`, also NAME,
    NAME/VERSION and NAME@ALIAS without the scheme."""
    match = _REGISTRY_RE.match(ref)
    if match is None or (not bare and not (match["scheme"] and (match["version"] or match["alias"]))):
        return None
    return RegistrySpec(name=match["name"], version=match["version"], alias=match["alias"])


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
    spec = parse_registry_ref(ref)
    if spec is not None:
        from lmctl import versions

        name, version = spec.name, spec.version
        if version is None:
            version = versions.version_for_alias(name, str(spec.alias))
        path = versions.download_version(name, version)
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


class VerifiedCheckpoint(BaseModel):
    """A MODEL_REF that is an lmctl checkpoint whose files matched its lock when resolved."""

    resolved: ResolvedRef
    path: Path
    manifest: checkpoint.Manifest
    manifest_sha256: str  # of its lmctl.json: names this exact checkpoint in reports and tags

    @property
    def ref(self) -> str:
        return self.resolved.ref

    @property
    def registry_name(self) -> str | None:
        return self.resolved.registry_name

    @property
    def registry_version(self) -> str | None:
        return self.resolved.registry_version

    @property
    def display_name(self) -> str:
        """Registry name, else the config's registry.name, else the checkpoint directory name."""
        return self.registry_name or self.manifest.config.registry.name or self.path.name


def verified_checkpoint(resolved: ResolvedRef, why: str = "give a checkpoint directory or a registry version",
                        hint: str | None = None) -> VerifiedCheckpoint:
    """Require that `resolved` is an lmctl checkpoint (BadInputError, exit 2, saying `why`) and
    verify every file against its lock (IntegrityError, exit 4, naming the file)."""
    if resolved.kind != "checkpoint":
        raise BadInputError(f"{resolved.ref}: not an lmctl checkpoint; {why}", hint=hint)
    path = Path(resolved.path)
    manifest = checkpoint.verify(path)
    return VerifiedCheckpoint(resolved=resolved, path=path, manifest=manifest,
                              manifest_sha256=checkpoint.sha256_file(path / checkpoint.MANIFEST))


def resolve_checkpoint(ref: str, why: str = "give a checkpoint directory or a registry version",
                       hint: str | None = None) -> VerifiedCheckpoint:
    """Resolve MODEL_REF, require a checkpoint and verify it: the one way commands get a checkpoint."""
    return verified_checkpoint(resolve(ref), why, hint)
