"""`lmctl deploy MODEL_REF --target local|vllm|kubernetes --out DIR`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmctl.cli.output import JsonOpt, TracebackOpt, emit


def deploy(
    model_ref: Annotated[str, typer.Argument(metavar="MODEL_REF", help="Checkpoint dir or models:/ reference.")],
    target: Annotated[str, typer.Option(help="local (bundle + start.sh), vllm (vllm serve script + config) or "
                                        "kubernetes (manifests; needs a models:/ reference).")],
    out: Annotated[Path, typer.Option(help="Output directory (must be empty unless --force).")],
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty output directory.")] = False,
    host: Annotated[str | None, typer.Option(help="Bind address (default 127.0.0.1 local, 0.0.0.0 vllm).")] = None,
    port: Annotated[int, typer.Option(help="Port the server listens on.")] = 8000,
    name: Annotated[str | None, typer.Option(help="Served model / Kubernetes name (default: registry name).")] = None,
    base: Annotated[str | None, typer.Option(help="vllm: base model path or hub id vLLM loads (default: the lock's).")] = None,
    max_loras: Annotated[int, typer.Option("--max-loras", help="vllm: adapters per batch.")] = 1,
    max_model_len: Annotated[int | None, typer.Option("--max-model-len", help="vllm: context length limit.")] = None,
    image: Annotated[str | None, typer.Option(help="kubernetes: image with lmctl installed.")] = None,
    namespace: Annotated[str, typer.Option(help="kubernetes: namespace.")] = "default",
    replicas: Annotated[int, typer.Option(help="kubernetes: stable replicas.")] = 1,
    cpu: Annotated[str, typer.Option(help="kubernetes: CPU request, e.g. 2 or 500m.")] = "2",
    memory: Annotated[str, typer.Option(help="kubernetes: memory request and limit, e.g. 4Gi.")] = "4Gi",
    gpus: Annotated[int, typer.Option(help="kubernetes: nvidia.com/gpu per pod.")] = 0,
    canary: Annotated[str | None, typer.Option(help="kubernetes: models:/ reference of a canary.")] = None,
    canary_weight: Annotated[int | None, typer.Option("--canary-weight", help="kubernetes: canary traffic percent (1-99, default 10).")] = None,
    gateway: Annotated[str, typer.Option(help="kubernetes: Gateway the canary HTTPRoute attaches to.")] = "lmctl-gateway",
    tracking_uri: Annotated[str | None, typer.Option("--tracking-uri", help="kubernetes: MLflow URI the pods use.")] = None,
    json_out: JsonOpt = False,
    traceback: TracebackOpt = False,
) -> None:
    """Materialize a deployment of a verified checkpoint: local bundle, vLLM or Kubernetes."""
    from pydantic import ValidationError

    from lmctl.deploy import DeployOptions
    from lmctl.deploy import deploy as run_deploy
    from lmctl.errors import BadInputError

    values = dict(host=host, port=port, name=name, base=base, max_loras=max_loras, max_model_len=max_model_len,
                  namespace=namespace, replicas=replicas, cpu=cpu, memory=memory, gpus=gpus, canary=canary,
                  canary_weight=canary_weight, gateway=gateway, tracking_uri=tracking_uri)
    if image is not None:
        values["image"] = image
    try:
        options = DeployOptions(**values)
    except ValidationError as exc:
        problems = "; ".join(f"--{'.'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in exc.errors())
        raise BadInputError(problems) from None
    emit(run_deploy(model_ref, target, out, options, force=force), json_out)
