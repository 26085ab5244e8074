"""`lmctl register`: turn a verified checkpoint into a new registry version.

The checkpoint is verified before anything is written. If any step after the version is
created fails, the version is deleted again, so no half-registered version stays behind.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from lmctl import __version__, checkpoint, registry
from lmctl.errors import BadInputError, DataError

log = logging.getLogger("lmctl.register")
EXPERIMENT = "lmctl-registry"


class RegisterResult(BaseModel):
    name: str
    version: str
    alias: str | None
    run_id: str
    source: str
    tracking_uri: str
    tokenizer_fingerprint: str
    metrics: dict[str, float]


def _eval_metrics(report: Path | None) -> dict[str, float]:
    if report is None:
        return {}
    try:
        data = json.loads(report.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"eval report {report} cannot be read: {exc}") from None
    metrics = data.get("metrics") if isinstance(data, dict) else None
    if not isinstance(metrics, dict):
        raise DataError(f"eval report {report} has no metrics object; write it with `lmctl eval --report`")
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _tags(manifest: checkpoint.Manifest, manifest_sha: str, metrics: dict[str, float]) -> dict[str, str]:
    tags = {
        "lmctl.version": __version__,
        "lmctl.manifest_sha256": manifest_sha,
        "lmctl.base_model": manifest.base_model.id,
        "lmctl.base_revision": manifest.base_model.revision or "",
        "lmctl.base_config_sha256": manifest.base_model.config_sha256,
        "lmctl.tokenizer_fingerprint": manifest.tokenizer.fingerprint,
        "lmctl.data_fingerprint": str(manifest.data.get("train", {}).get("sha256", "")),
        "lmctl.training_run_id": str(manifest.training.get("mlflow_run_id", "")),
    }
    tags.update({f"eval.{k}": f"{v:.6g}" for k, v in metrics.items()})
    return tags


def register(ckpt: Path, name: str, alias: str | None = None, eval_report: Path | None = None) -> RegisterResult:
    """Log the checkpoint as MLflow run artifacts and create a model version pointing at them."""
    registry.validate_name(name)
    if alias:
        registry.validate_alias(alias)
    if not ckpt.is_dir() or not checkpoint.is_checkpoint(ckpt):
        raise BadInputError(f"{ckpt}: not an lmctl checkpoint directory (no lmctl.json)")
    manifest = checkpoint.verify(ckpt)
    metrics = _eval_metrics(eval_report)
    manifest_sha = checkpoint.sha256_file(ckpt / checkpoint.MANIFEST)
    client = registry.client()
    run = client.create_run(registry.experiment_id(client, EXPERIMENT), run_name=f"register-{name}")
    run_id = run.info.run_id
    version: Any = None
    try:
        client.log_artifacts(run_id, str(ckpt), "checkpoint")
        for key, value in metrics.items():
            client.log_metric(run_id, key, value)
        with registry.registry_lock():
            if not client.search_registered_models(f"name='{name}'"):
                client.create_registered_model(name, description="Managed by lmctl")
            version = client.create_model_version(
                name, source=f"{run.info.artifact_uri}/checkpoint", run_id=run_id,
                tags=_tags(manifest, manifest_sha, metrics),
                description=f"LoRA adapter on {manifest.base_model.id}, step {manifest.training.get('step', '?')}",
            )
        if alias:
            registry.move_alias(name, alias, str(version.version), reason="set at register")
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        if version is not None:
            client.delete_model_version(name, str(version.version))
        client.set_terminated(run_id, "FAILED")
        raise
    log.info("registered %s version %s", name, version.version)
    return RegisterResult(
        name=name, version=str(version.version), alias=alias, run_id=run_id, source=version.source,
        tracking_uri=registry.tracking_uri(), tokenizer_fingerprint=manifest.tokenizer.fingerprint, metrics=metrics,
    )
