"""`lmctl register`: turn a verified checkpoint into a new registry version.

Before anything is written, the checkpoint is verified against its lock and its tokenizer
is compared with the base model's: it may differ only by added special tokens whose
embedding rows the adapter saves (exit 4 otherwise).

Order of writes, so that no kill leaves a usable half-version: run (tagged with this
process) -> checkpoint artifacts -> version tagged `lmctl.status=pending` -> model card
-> `lmctl.status=ready` -> alias. If a step raises, the version is deleted again; if the
process is killed (SIGKILL, power loss), the pending version shows as FAILED, is never
resolved or promoted, and the next `lmctl register` removes it and its run.

Fault injection for tests: `LMCTL_REGISTER_CRASH_AT=after_run|after_upload|after_version|after_card`
makes this process SIGKILL itself at that point.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pydantic import BaseModel

from lmctl import __version__, checkpoint, tokenizer_lock, tracking, versions
from lmctl.atomic import crash_point
from lmctl.config import PRODUCTION_ALIAS
from lmctl.errors import BadInputError, IntegrityError
from lmctl.evaluate.schema import LoadedReport, load_eval_report
from lmctl.registry import model_card
from lmctl.registry.aliases import move_alias

log = logging.getLogger("lmctl.registry.register")
EXPERIMENT = "lmctl-registry"
CHECKPOINT_ARTIFACT = "checkpoint"  # the registration run's artifact folder holding the checkpoint (the version's source)
CRASH_ENV = "LMCTL_REGISTER_CRASH_AT"


class RegisterResult(BaseModel):
    name: str
    version: str
    alias: str | None
    run_id: str
    source: str
    tracking_uri: str
    tokenizer_fingerprint: str
    added_tokens: dict[str, int]
    metrics: dict[str, float]
    model_card: str
    parent_version: str | None
    cleaned: list[str]


def check_tokenizer(ckpt: Path, manifest: checkpoint.Manifest) -> dict[str, int]:
    """The checkpoint's tokenizer against its lock and against its base model's tokenizer;
    returns the added tokens (whose rows the adapter must carry). IntegrityError otherwise."""
    from safetensors import safe_open
    from transformers import AutoConfig

    from lmctl.loading import load_tokenizer
    from lmctl.modelref import resolve_base

    tokenizer = load_tokenizer(str(ckpt))
    locked = manifest.tokenizer.model_dump(exclude={"files", "fingerprint"})
    diffs = tokenizer_lock.behaviour_differences(tokenizer_lock.tokenizer_behaviour(tokenizer), locked)
    if diffs:
        raise IntegrityError(f"{ckpt}: the tokenizer files do not behave as locked in lmctl.json: {'; '.join(diffs)}")
    trust = manifest.trust_remote_code
    base, revision = resolve_base(manifest.base_model.id), manifest.base_model.revision
    diffs, added = tokenizer_lock.tokenizer_delta(tokenizer, load_tokenizer(base, trust, revision))
    if diffs:
        raise IntegrityError(f"{ckpt}: the tokenizer differs from base model {manifest.base_model.id}'s: {'; '.join(diffs)}",
                             hint="register checkpoints as `lmctl train` wrote them, with the base model's tokenizer")
    if added:
        adapter_config = json.loads((ckpt / "adapter_config.json").read_text(encoding="utf-8"))
        with safe_open(str(ckpt / "adapter_model.safetensors"), "pt") as fh:
            shapes = {key: list(fh.get_slice(key).get_shape()) for key in fh.keys()}
        rows = tokenizer_lock.saved_token_rows(adapter_config, shapes, len(tokenizer))
        tied = tokenizer_lock.ties_embeddings(AutoConfig.from_pretrained(base, revision=revision, trust_remote_code=trust))
        tokenizer_lock.check_added_rows_saved(added, rows, tied, str(ckpt))
    return added


def _tags(manifest: checkpoint.Manifest, manifest_sha: str, metrics: dict[str, float]) -> dict[str, str]:
    tags = {
        "lmctl.version": __version__,
        "lmctl.manifest_sha256": manifest_sha,
        "lmctl.base_model": manifest.base_model.id,
        "lmctl.base_revision": manifest.base_model.revision or "",
        "lmctl.base_config_sha256": manifest.base_model.config_sha256,
        "lmctl.tokenizer_fingerprint": manifest.tokenizer.fingerprint,
        "lmctl.data_fingerprint": manifest.data.train.sha256 if manifest.data.train else "",
        "lmctl.training_run_id": manifest.training.mlflow_run_id or "",
    }
    tags.update({f"eval.{k}": f"{v:.6g}" for k, v in metrics.items()})
    return tags


def _remove_run(mlflow_client: Any, run: Any) -> None:
    """Mark a dead registration's run failed, delete it and, on a local store, its artifacts."""
    from mlflow.exceptions import MlflowException

    with contextlib.suppress(MlflowException):
        mlflow_client.set_terminated(run.info.run_id, "FAILED")
        mlflow_client.delete_run(run.info.run_id)
    uri = urlparse(run.info.artifact_uri or "")
    if uri.scheme == "file":
        shutil.rmtree(uri.path, ignore_errors=True)
        with contextlib.suppress(OSError):
            Path(uri.path).parent.rmdir()  # the run's own directory, when nothing else is in it


def _still_running(mlflow_client: Any, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.get_run(run_id).info.status == "RUNNING"
    except MlflowException:
        return False


def clean_failed(mlflow_client: Any) -> list[str]:
    """Remove what killed registrations left behind: FAILED versions, then runs of this
    experiment still RUNNING whose registering process is gone. Live ones are left alone."""
    from mlflow.exceptions import MlflowException

    # The search results may be stale: the registrar may have finished and exited since. So the
    # registrar is found dead *first*, and only then is the state re-read; a dead process cannot
    # change it any more, so "still pending/running" read after that is final. (On one machine the
    # registry lock already orders this; other machines on a team server do not share that lock.)
    removed = []
    with tracking.registry_lock():
        for mv in mlflow_client.search_model_versions(f"tags.`{versions.STATUS_TAG}` = 'pending'"):
            if versions.registrar_gone(dict(mv.tags or {})):
                with contextlib.suppress(MlflowException):
                    fresh = mlflow_client.get_model_version(mv.name, str(mv.version))
                    if (fresh.tags or {}).get(versions.STATUS_TAG) == "pending":
                        mlflow_client.delete_model_version(mv.name, str(mv.version))
                        removed.append(f"models:/{mv.name}/{mv.version}")
    experiment = mlflow_client.get_experiment_by_name(EXPERIMENT)
    if experiment is not None:
        for run in mlflow_client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'"):
            if versions.registrar_gone(dict(run.data.tags)) and _still_running(mlflow_client, run.info.run_id):
                _remove_run(mlflow_client, run)
                removed.append(f"run {run.info.run_id}")
    for item in removed:
        log.warning("removed %s, left behind by a killed `lmctl register`", item)
    return removed


def ensure_registered_model(mlflow_client, name: str, description: str) -> None:  # type: ignore[no-untyped-def]
    """Create the registered model unless it exists. On a team server the local lock does not
    reach other machines, so two first registers may race: the loser's "already exists" is fine.
    A model whose description is still lmctl's old placeholder gets `description`; one a person
    wrote is left alone."""
    from mlflow.exceptions import MlflowException

    existing = mlflow_client.search_registered_models(f"name='{name}'")
    if existing:
        if (existing[0].description or "").strip() in ("", model_card.OLD_MODEL_DESCRIPTION):
            mlflow_client.update_registered_model(name, description=description)
        return
    try:
        mlflow_client.create_registered_model(name, description=description)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise



@dataclass(frozen=True)
class _Checked:
    """Everything `register` validated before it writes: the checkpoint, its lock, its report."""

    ckpt: Path
    manifest: checkpoint.Manifest
    manifest_sha256: str
    added_tokens: dict[str, int]
    report: LoadedReport | None
    report_path: Path | None

    @property
    def metrics(self) -> dict[str, float]:
        return self.report.report.metrics if self.report is not None else {}


def _check(ckpt: Path, name: str, alias: str | None, eval_report: Path | None) -> _Checked:
    versions.validate_name(name)
    if alias:
        versions.validate_alias(alias)
    if not ckpt.is_dir() or not checkpoint.is_checkpoint(ckpt):
        raise BadInputError(f"{ckpt}: not an lmctl checkpoint directory (no lmctl.json)")
    manifest = checkpoint.verify(ckpt)
    added = check_tokenizer(ckpt, manifest)
    report = load_eval_report(eval_report) if eval_report is not None else None
    return _Checked(ckpt=ckpt, manifest=manifest, manifest_sha256=checkpoint.sha256_file(ckpt / checkpoint.MANIFEST),
                    added_tokens=added, report=report, report_path=eval_report)


def _summary(description: str | None, manifest: checkpoint.Manifest) -> str:
    """The version's one-line description: the user's first line, then what the adapter is."""
    step = "?" if manifest.training.step is None else manifest.training.step
    what = f"LoRA adapter on {manifest.base_model.id}, step {step}"
    return f"{description.strip().splitlines()[0]} ({what})" if description and description.strip() else what


def _upload(client: Any, run_id: str, checked: _Checked) -> None:
    client.log_artifacts(run_id, str(checked.ckpt), CHECKPOINT_ARTIFACT)
    for key, value in checked.metrics.items():
        client.log_metric(run_id, key, value)


def _create_pending(client: Any, run: Any, name: str, checked: _Checked, summary: str,
                    parent_alias: str) -> tuple[Any, str | None]:
    """The version, tagged pending (and with who registers it), and the version `parent_alias`
    held when it was created; under the registry lock, which also orders the model's creation."""
    with tracking.registry_lock():
        ensure_registered_model(client, name, model_card.model_description(name, checked.manifest))
        parent = versions.alias_holder(name, parent_alias)
        version = client.create_model_version(
            name, source=f"{run.info.artifact_uri}/{CHECKPOINT_ARTIFACT}", run_id=run.info.run_id,
            tags={**_tags(checked.manifest, checked.manifest_sha256, checked.metrics), **versions.registrar_tags(),
                  versions.STATUS_TAG: "pending", "lmctl.parent_version": parent or ""},
            description=summary,
        )
    return version, parent


def _publish_card(client: Any, run_id: str, version: Any, parent: str | None, checked: _Checked,
                  description: str | None) -> tuple[str, dict[str, str]]:
    """The model card rendered and logged to the run; returns it and its tags."""
    card = model_card.render(model_card.CardFacts(
        name=version.name, version=str(version.version), description=description, manifest=checked.manifest,
        manifest_sha256=checked.manifest_sha256, report=checked.report.report if checked.report else None,
        report_path=checked.report.path if checked.report else None,
        parent_version=parent, run_id=run_id, source=version.source, added_tokens=checked.added_tokens))
    return card, model_card.publish(client, run_id, card)


def _mark_ready(client: Any, run_id: str, version: Any, summary: str, card: str, card_tags: dict[str, str]) -> None:
    """Description and card tags on the version, then `ready` last: only now is it usable."""
    name, number = version.name, str(version.version)
    with tracking.registry_lock():
        client.update_model_version(name, number, description=model_card.version_description(
            summary, card, card_tags[model_card.CARD_TAG], shown={version.source: f"runs:/{run_id}/{CHECKPOINT_ARTIFACT}"}))
        for key, value in card_tags.items():
            client.set_model_version_tag(name, number, key, value)
        client.set_model_version_tag(name, number, versions.STATUS_TAG, "ready")


def register(ckpt: Path, name: str, alias: str | None = None, eval_report: Path | None = None,
             description: str | None = None, parent_alias: str = PRODUCTION_ALIAS) -> RegisterResult:
    """Log the checkpoint as MLflow run artifacts and create a model version pointing at them.
    `parent_alias`'s holder at registration is recorded as the version's parent."""
    checked = _check(ckpt, name, alias, eval_report)
    summary = _summary(description, checked.manifest)
    client = tracking.client()
    cleaned = clean_failed(client)
    run = client.create_run(tracking.experiment_id(client, EXPERIMENT), run_name=f"register-{name}",
                            tags=versions.registrar_tags())
    run_id = run.info.run_id
    crash_point(CRASH_ENV, "after_run")
    version: Any = None
    try:
        _upload(client, run_id, checked)
        crash_point(CRASH_ENV, "after_upload")
        version, parent = _create_pending(client, run, name, checked, summary, parent_alias)
        crash_point(CRASH_ENV, "after_version")
        card, card_tags = _publish_card(client, run_id, version, parent, checked, description)
        crash_point(CRASH_ENV, "after_card")
        _mark_ready(client, run_id, version, summary, card, card_tags)
        if alias:
            move_alias(name, alias, str(version.version), reason="set at register")
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        if version is not None:
            client.delete_model_version(name, str(version.version))
        client.set_terminated(run_id, "FAILED")
        raise
    log.info("registered %s version %s", name, version.version)
    return RegisterResult(
        name=name, version=str(version.version), alias=alias, run_id=run_id, source=version.source,
        tracking_uri=tracking.tracking_uri(), tokenizer_fingerprint=checked.manifest.tokenizer.fingerprint,
        added_tokens=checked.added_tokens, metrics=checked.metrics, model_card=card_tags[model_card.CARD_TAG],
        parent_version=parent, cleaned=cleaned,
    )
