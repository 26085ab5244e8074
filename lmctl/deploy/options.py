"""`DeployOptions`: what `lmctl deploy` can be told, typed, with the help text its flags show.

Only pydantic here: the CLI builds `deploy`'s flags from this model at start-up.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from lmctl import __version__

Target = Literal["local", "vllm", "kubernetes"]
TARGETS: tuple[Target, ...] = ("local", "vllm", "kubernetes")


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
