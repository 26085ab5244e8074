"""What every deploy target shares: the verified source checkpoint, the rendered result, and
the helpers that copy a checkpoint, write a script and the `deploy.json` manifest."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from lmctl import __version__, checkpoint
from lmctl.clock import utc_now
from lmctl.errors import BadInputError
from lmctl.deploy.options import Target
from lmctl.modelref import VerifiedCheckpoint, parse_registry_ref, resolve_checkpoint

DEPLOY_FORMAT = "lmctl.deploy/1"


class DeployResult(BaseModel):
    target: Target
    out: str
    source: str
    registry_name: str | None = None
    registry_version: str | None = None
    manifest_sha256: str
    files: list[str]
    commands: dict[str, str]
    warnings: list[str] = Field(default_factory=list)


Source = VerifiedCheckpoint  # what every target renders from


@dataclass
class Rendered:
    """What a target wrote into the staging directory, besides the files themselves."""

    commands: dict[str, str]
    warnings: list[str]
    target_info: dict[str, Any]


def load_source(ref: str) -> Source:
    """Resolve MODEL_REF to a verified checkpoint (exit 2 for a plain model, exit 4 on a lock mismatch)."""
    return resolve_checkpoint(ref, "deploy takes a checkpoint or a registry version",
                              hint="train and register an adapter first")


def adapter_config(source: Source) -> dict[str, Any]:
    """The adapter's peft config as saved (adapter_config.json is hashed in the lock)."""
    import json

    path = source.path / "adapter_config.json"
    if not path.is_file():
        raise BadInputError(f"{source.path}: no adapter_config.json; only LoRA adapters can be deployed")
    return json.loads(path.read_text(encoding="utf-8"))


def copy_checkpoint(source: Source, dest: Path) -> None:
    """Copy the checkpoint and verify the copy, so the bundle is proven identical to the lock."""
    import shutil

    shutil.copytree(source.path, dest)
    checkpoint.verify(dest)


def write_script(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")
    path.chmod(0o755)


def manifest_doc(source: Source, target: str, target_info: dict[str, Any]) -> dict[str, Any]:
    """`deploy.json`: what was deployed, from where, with which lock, and how it is served."""
    m = source.manifest
    return {
        "format": DEPLOY_FORMAT,
        "target": target,
        "created_at": utc_now(),
        "lmctl_version": __version__,
        "model_ref": source.ref,
        "registry": ({"name": source.registry_name, "version": source.registry_version}
                     if source.registry_name else None),
        "manifest_sha256": source.manifest_sha256,
        "tokenizer_fingerprint": m.tokenizer.fingerprint,
        "base_model": {**m.base_model.model_dump(), "copied": False,
                       "note": "the base model is referenced, not copied; it must be loadable where this runs"},
        **target_info,
    }


def make_readable(root: Path) -> None:
    """mkdtemp/mkstemp create 0700/0600 entries and checkpoints keep their modes; a bundle is
    read by whatever user serves it (a container user, a vLLM service), and holds no secret."""
    root.chmod(0o755)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() or os.access(path, os.X_OK) else 0o644)


def require_registry_ref(ref: str, flag: str) -> None:
    """Kubernetes pods load their model from the registry: `ref` must be a models:/ reference."""
    if parse_registry_ref(ref) is None:
        raise BadInputError(f"{flag} {ref!r}: pods load models from the registry; give models:/NAME/VERSION or "
                            "models:/NAME@ALIAS", hint="register the checkpoint first (lmctl register)")


def listed_files(root: Path) -> list[str]:
    """The files under `root`, relative and sorted: what a result's `files` lists."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
