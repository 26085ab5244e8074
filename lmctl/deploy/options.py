"""What `lmctl deploy` (`DeployOptions`) and `lmctl train --emit kubernetes` (`TrainJobOptions`) can be
told, typed, with the help text their flags show.

Only pydantic here: the CLI builds those flags from these models at start-up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lmctl import __version__
from lmctl.shares import parse_steps

Target = Literal["local", "vllm", "kubernetes"]
TARGETS: tuple[Target, ...] = ("local", "vllm", "kubernetes")


class DeployOptions(BaseModel):
    """Target options; each target reads the ones that concern it and ignores the rest."""

    model_config = ConfigDict(defer_build=True)

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
    canary_steps: list[float] | None = Field(
        None, description="kubernetes: canary shares of a gradual rollout (e.g. 0.05,0.25,0.5,1.0): one HTTPRoute per "
        "step, httproute-step-N.yaml, applied in turn; httproute.yaml starts at the first.")
    canary_replicas: int = Field(1, ge=1, description="kubernetes: canary replicas.")
    gateway: str = Field("lmctl-gateway", description="kubernetes: Gateway the HTTPRoute attaches to.")
    tracking_uri: str | None = Field(None, description="kubernetes: MLflow registry URI the pods use.")
    max_replicas: int | None = Field(None, ge=1, description="kubernetes: HorizontalPodAutoscaler maxReplicas "
                                     "(default: max(4, --replicas)); equal to --replicas renders no autoscaler.")
    target_cpu: int = Field(70, ge=1, le=1000, description="kubernetes: average CPU utilization (percent of the "
                            "CPU request) the autoscaler keeps the pods at.")
    max_unavailable: int = Field(1, ge=1, description="kubernetes: PodDisruptionBudget maxUnavailable: pods a node "
                                 "drain may take down at once.")
    slo: Path | None = Field(None, description="local/kubernetes: YAML file of SLOs the Prometheus alerting rules "
                             "check (default: 99.5% availability over 30d, p95 1s, p99 2.5s, TTFT p95 0.5s; "
                             "see docs/operations.md).")

    @field_validator("canary_steps", mode="before")
    @classmethod
    def _parse_steps(cls, value: object) -> object:
        return None if value is None else parse_steps(value)


class TrainJobOptions(BaseModel):
    """What `--emit kubernetes` renders besides the config; each field is a flag of `lmctl train`."""

    model_config = ConfigDict(defer_build=True)

    nodes: int = Field(1, ge=1, description="Pods the training runs on (torchrun --nnodes).")
    gpus_per_node: int = Field(1, ge=0, description="nvidia.com/gpu per pod and torchrun --nproc-per-node "
                               "(0: one CPU process per pod, gloo).")
    image: str = Field(f"lmctl:{__version__}", description="Container image with lmctl, torchrun and /bin/sh.")
    namespace: str = Field("default", description="Kubernetes namespace.")
    name: str | None = Field(None, description="Job and headless Service name (default: output.run_name and -train).")
    cpu: str = Field("4", description="CPU request per pod.")
    memory: str = Field("32Gi", description="Memory request and limit per pod (/dev/shm counts towards it).")
    data_claim: str = Field("lmctl-data", description="PersistentVolumeClaim holding the data, mounted read-only "
                            "(ReadOnlyMany or ReadWriteMany when --nnodes > 1).")
    data_mount: str = Field("/data", description="Where the pods mount the data volume.")
    data_root: Path | None = Field(None, description="Local directory whose contents are on the data volume: config "
                                   "paths under it map to --data-mount (default: the config file's directory).")
    output_claim: str = Field("lmctl-runs", description="PersistentVolumeClaim for runs, checkpoints and LMCTL_HOME "
                              "(ReadWriteMany when --nnodes > 1).")
    output_mount: str = Field("/runs", description="Where the pods mount the output volume (output.dir).")
    tracking_secret: str = Field("lmctl-tracking", description="Secret holding the MLflow tracking URI.")
    tracking_secret_key: str = Field("uri", description="Key of the tracking URI in --tracking-secret.")
    max_restarts: int = Field(3, ge=0, description="torchrun --max-restarts: restarts of all workers after one fails.")
    backoff_limit: int | None = Field(None, ge=0, description="Pod failures before the Job fails (default 2 x "
                                      "--nnodes: losing pod 0 fails every pod's rendezvous). Evictions and "
                                      "preemptions do not count.")
