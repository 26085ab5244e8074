"""`lmctl deploy MODEL_REF --target local|vllm|kubernetes --out DIR`: materialize a deployment.

Every target starts the same way: the reference is resolved, the checkpoint lock is
verified (exit 4 on any mismatch) and all options are validated before a single file is
written. The target then renders into a hidden staging directory beside `--out`, which
is renamed into place only when everything was written: a failed deploy leaves nothing.

- local: a relocatable bundle (verified checkpoint copy + `deploy.json` + `start.sh`).
- vllm: `vllm.sh` and a `vllm serve --config` YAML for the base model plus the adapter.
- kubernetes: Deployment, Service (and a canary Deployment/Service with a weighted
  Gateway API HTTPRoute) plus `kustomization.yaml`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from lmctl import __version__, atomic, checkpoint
from lmctl.clock import utc_now
from lmctl.errors import BadInputError
from lmctl.modelref import VerifiedCheckpoint, parse_registry_ref, resolve_checkpoint

log = logging.getLogger("lmctl.deploy")
Target = Literal["local", "vllm", "kubernetes"]
TARGETS: tuple[Target, ...] = ("local", "vllm", "kubernetes")
DEPLOY_FORMAT = "lmctl.deploy/1"


class DeployOptions(BaseModel):
    """Target options; each target reads the ones that concern it and ignores the rest."""

    host: str | None = Field(None, description="Bind address (local: 127.0.0.1, vllm/kubernetes: 0.0.0.0).")
    port: int = Field(8000, ge=1, le=65535, description="Port the server listens on.")
    name: str | None = Field(None, description="Served model / Kubernetes name (default: registry name).")
    base: str | None = Field(None, description="vllm: where vLLM loads the base model from (path or hub id).")
    max_loras: int = Field(1, ge=1, description="vllm: adapters per batch.")
    max_model_len: int | None = Field(None, ge=1, description="vllm: context length limit.")
    image: str = Field(f"lmctl:{__version__}", description="kubernetes: container image with lmctl installed.")
    namespace: str = Field("default", description="kubernetes: namespace.")
    replicas: int = Field(1, ge=0, description="kubernetes: stable replicas.")
    cpu: str = Field("2", description="kubernetes: CPU request.")
    memory: str = Field("4Gi", description="kubernetes: memory request and limit.")
    gpus: int = Field(0, ge=0, description="kubernetes: nvidia.com/gpu per pod.")
    canary: str | None = Field(None, description="kubernetes: MODEL_REF of a canary.")
    canary_weight: float | None = Field(
        None, description="kubernetes: share of traffic for the canary, 0-1 as for `lmctl serve` (default 0.1).")
    canary_replicas: int = Field(1, ge=1, description="kubernetes: canary replicas.")
    gateway: str = Field("lmctl-gateway", description="kubernetes: Gateway the HTTPRoute attaches to.")
    tracking_uri: str | None = Field(None, description="kubernetes: MLflow registry URI the pods use.")


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


def _check_options(ref: str, target: str, opts: DeployOptions) -> None:
    if target not in TARGETS:
        raise BadInputError(f"--target {target!r}: expected one of {', '.join(TARGETS)}")
    if target == "kubernetes":
        require_registry_ref(ref, "MODEL_REF")
    k8s_only = {"canary": opts.canary, "canary_weight": opts.canary_weight}
    given = [k.replace("_", "-") for k, v in k8s_only.items() if v is not None]
    if target != "kubernetes" and given:
        raise BadInputError(f"--{given[0]} applies to --target kubernetes only")


def deploy(ref: str, target: str, out: Path, options: DeployOptions | None = None, force: bool = False) -> DeployResult:
    """Validate, verify, render the target into a staging dir, then rename it to `out`."""
    from lmctl.deploy import kubernetes, local, vllm

    opts = options or DeployOptions()
    _check_options(ref, target, opts)
    atomic.require_empty_output(out, force)
    final = Path(os.path.abspath(out))
    renderers = {"local": local.Renderer, "vllm": vllm.Renderer, "kubernetes": kubernetes.Renderer}
    renderer = renderers[target](opts, final)  # options first: cheap, and nothing is resolved yet
    source = load_source(ref)
    renderer.prepare(source)  # target checks that need the checkpoint; still writes nothing
    with atomic.staging_dir(final) as stage:
        rendered = renderer.render(stage)
        atomic.write_json_atomic(stage / "deploy.json", manifest_doc(source, target, rendered.target_info))
        make_readable(stage)
    for warning in rendered.warnings:
        log.warning("warning: %s", warning)
    return DeployResult(target=target, out=str(final), source=ref, registry_name=source.registry_name,
                        registry_version=source.registry_version, manifest_sha256=source.manifest_sha256,
                        files=listed_files(final), commands=rendered.commands, warnings=rendered.warnings)


def listed_files(root: Path) -> list[str]:
    """The files under `root`, relative and sorted: what a result's `files` lists."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
