"""`lmctl deploy MODEL_REF --target local|vllm|kubernetes --out DIR`: option flags, defaults and help come from DeployOptions."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmctl.cli.fields import option, options_from
from lmctl.cli.output import JsonOpt, TracebackOpt, emit
from lmctl.deploy.options import DeployOptions as D


def deploy(
    model_ref: Annotated[str, typer.Argument(metavar="MODEL_REF", help="Checkpoint dir or models:/ reference.")],
    target: Annotated[str, typer.Option(help="local (bundle + start.sh), vllm (vllm serve script + config) or "
                                        "kubernetes (manifests; needs a models:/ reference).")],
    out: Annotated[Path, typer.Option(help="Output directory (must be empty unless --force).")],
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty output directory.")] = False,
    host: str | None = option(D, "host"),
    port: int = option(D, "port"),
    name: str | None = option(D, "name"),
    base: str | None = option(D, "base"),
    max_loras: int = option(D, "max_loras", "--max-loras"),
    max_model_len: int | None = option(D, "max_model_len", "--max-model-len"),
    image: str = option(D, "image"),
    namespace: str = option(D, "namespace"),
    replicas: int = option(D, "replicas"),
    cpu: str = option(D, "cpu"),
    memory: str = option(D, "memory"),
    gpus: int = option(D, "gpus"),
    canary: str | None = option(D, "canary"),
    canary_weight: float | None = option(D, "canary_weight", "--canary-weight"),
    canary_steps: str | None = option(D, "canary_steps", "--canary-steps", metavar="SHARES"),
    gateway: str = option(D, "gateway"),
    tracking_uri: str | None = option(D, "tracking_uri", "--tracking-uri"),
    max_replicas: int | None = option(D, "max_replicas", "--max-replicas"),
    target_cpu: int = option(D, "target_cpu", "--target-cpu"),
    max_unavailable: int = option(D, "max_unavailable", "--max-unavailable"),
    slo: Path | None = option(D, "slo", "--slo", metavar="FILE"),
    json_out: JsonOpt = False,
    traceback: TracebackOpt = False,
) -> None:
    """Materialize a deployment of a verified checkpoint: local bundle, vLLM or Kubernetes."""
    from lmctl.deploy.run import deploy as run_deploy

    options = options_from(D, dict(
        host=host, port=port, name=name, base=base, max_loras=max_loras, max_model_len=max_model_len, image=image,
        namespace=namespace, replicas=replicas, cpu=cpu, memory=memory, gpus=gpus, canary=canary,
        canary_weight=canary_weight, canary_steps=canary_steps, gateway=gateway, tracking_uri=tracking_uri, max_replicas=max_replicas,
        target_cpu=target_cpu, max_unavailable=max_unavailable, slo=slo))
    emit(run_deploy(model_ref, target, out, options, force=force), json_out)
