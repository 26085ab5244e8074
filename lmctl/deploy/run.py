"""`lmctl deploy MODEL_REF --target local|vllm|kubernetes --out DIR`: materialize a deployment.

Every target starts the same way: the reference is resolved, the checkpoint lock is
verified (exit 4 on any mismatch) and all options are validated before a single file is
written. The target then renders into a hidden staging directory beside `--out`, which
is renamed into place only when everything was written: a failed deploy leaves nothing.

- local: a relocatable bundle (verified checkpoint copy + `deploy.json` + `start.sh`) and the
  Prometheus alerting rules of its SLOs (`alerts.rules.yaml`, lmctl.deploy.alerts).
- vllm: `vllm.sh` and a `vllm serve --config` YAML for the base model plus the adapter.
- kubernetes: Deployment, Service (and a canary Deployment/Service with a weighted
  Gateway API HTTPRoute), an autoscaler and a disruption budget, `kustomization.yaml`, and the
  alerting rules as a rule file and a prometheus-operator PrometheusRule.
"""


from __future__ import annotations

import logging
import os
from pathlib import Path

from lmctl import atomic
from lmctl.deploy import kubernetes, local, vllm
from lmctl.deploy.bundle import (DeployResult, listed_files, load_source, make_readable, manifest_doc,
                                 require_registry_ref)
from lmctl.deploy.options import TARGETS, DeployOptions
from lmctl.errors import BadInputError

log = logging.getLogger("lmctl.deploy")


def _check_options(ref: str, target: str, opts: DeployOptions) -> None:
    if target not in TARGETS:
        raise BadInputError(f"--target {target!r}: expected one of {', '.join(TARGETS)}")
    if target == "kubernetes":
        require_registry_ref(ref, "MODEL_REF")
    k8s_only = {"canary": opts.canary, "canary_weight": opts.canary_weight, "max_replicas": opts.max_replicas}
    given = [k.replace("_", "-") for k, v in k8s_only.items() if v is not None]
    if target != "kubernetes" and given:
        raise BadInputError(f"--{given[0]} applies to --target kubernetes only")
    if target == "vllm" and opts.slo is not None:
        raise BadInputError("--slo applies to --target local and kubernetes (vLLM exports its own metrics)")


def deploy(ref: str, target: str, out: Path, options: DeployOptions | None = None, force: bool = False) -> DeployResult:
    """Validate, verify, render the target into a staging dir, then rename it to `out`."""
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
