"""`lmctl train CONFIG --emit kubernetes --out DIR`: the same training as a Kubernetes Job.

    OUT/configmap.yaml      the resolved config, its paths rewritten to the pods' mounts
    OUT/service.yaml        a headless Service: pod i of the Job is reachable as JOB-i.JOB
    OUT/job.yaml            an Indexed Job of --nnodes pods, each running torchrun
    OUT/kustomization.yaml  `kubectl apply -k OUT`

Why an Indexed Job: `batch/v1` Job with `completionMode: Indexed` is built into every cluster
(stable since Kubernetes 1.24), so nothing needs installing; PyTorchJob needs the Kubeflow
training operator and JobSet the JobSet controller. Each pod gets the stable hostname JOB-INDEX,
and with `subdomain` naming the headless Service, pod 0 is JOB-0.JOB: the endpoint of torchrun's
c10d rendezvous. torch.distributed.elastic does the rest (rendezvous, RANK/WORLD_SIZE, worker
restarts with --max-restarts); lmctl launches no process itself.

Pod 0 hosts the rendezvous store. Left alone, torch guesses whether it is the host by resolving
the endpoint and comparing addresses (c10d_rendezvous_backend._create_tcp_store), which races
the cluster DNS publishing pod 0's record; so a one-line /bin/sh wrapper passes
`--rdzv-conf=is_host=1` on index 0 (JOB_COMPLETION_INDEX, set by the Job controller) and 0
elsewhere, and the container's args are torchrun's own argv.

One pod per machine: the pods carry a *required* pod anti-affinity on `kubernetes.io/hostname`
against the Job's own pods. Preferred (soft) anti-affinity would let the scheduler put two pods
on one machine when it is short of free ones, and such a job does not just run slower: NCCL
sees one host (same hostname hash) and tries shared memory between two containers that do not
share /dev/shm; and one machine failing takes both pods. With too few machines the surplus pods
stay Pending with an event naming the anti-affinity rule, which an operator can act on.

Ports between the pods: 29400 on pod 0 (the c10d rendezvous), and then ports torch and the
collectives pick. Rank 0's agent (on whichever pod the rendezvous made node 0) opens the
workers' store on a free port (torch 2.13: RendezvousStoreInfo.build -> get_free_port with
TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, a port-0 TCPStore without it; torchrun's --master-port
is read only by the static backend), and NCCL and gloo connect ranks on ephemeral ports. So
none of it can be pinned to one port: a NetworkPolicy must let the Job's pods reach each other
on every TCP port (docs/distributed.md gives one).

Paths: the data volume holds the contents of --data-root (default: the config file's
directory), so a config path under it becomes the same relative path under --data-mount; a
path already under --data-mount is kept; any other data path is refused (exit 2). The output
volume is the runs directory (output.dir) and holds LMCTL_HOME, so the tokenization cache and
pulled base models survive pod restarts. The MLflow tracking URI comes from a Secret.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shlex
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, Field

from lmctl import __version__, atomic
from lmctl.config import LmctlConfig
from lmctl.deploy.bundle import listed_files, make_readable
from lmctl.deploy.options import TrainJobOptions
from lmctl.deploy.kubernetes import base_model_warnings, check_workload, dns_label, dump, labels, selector
from lmctl.errors import BadInputError
from lmctl.train.launch import RDZV_PORT, SHARE_STORE_ENV, LaunchOptions
from lmctl.train.plan import rows_per_step

log = logging.getLogger("lmctl.deploy")
EMIT_TARGETS = ("kubernetes",)
JOB_SUFFIX = "-train"  # the Job is RUN_NAME-train: a training job at a glance, apart from serving's objects
INDEX_ROOM = 7  # "-" and up to 6 digits: a pod's hostname JOB-INDEX must stay a 63-character DNS label
HOSTNAME_TOPOLOGY = "kubernetes.io/hostname"
TRACK = "train"
CONFIG_DIR = PurePosixPath("/config")
CONFIG_FILE = CONFIG_DIR / "config.yaml"
SHM = PurePosixPath("/dev/shm")
# Config sections `lmctl train` does not read; they hold paths and a webhook of other commands
UNUSED_SECTIONS = {"retrain", "drift"}
# Pod 0 hosts the rendezvous store (see the module docstring); "$@" is torchrun's argv, and the
# wrapper passes torchrun's one --rdzv-conf (LaunchOptions.rdzv_conf: join_timeout and is_host)
HOST_WRAPPER = ('if [ "$JOB_COMPLETION_INDEX" = 0 ]; then host=1; else host=0; fi; '
                'exec torchrun --rdzv-conf={rdzv_conf} "$@"')
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]{1,253}$")


class TrainJobResult(BaseModel):
    target: Literal["kubernetes"] = "kubernetes"
    out: str
    job: str
    namespace: str
    nodes: int
    gpus_per_node: int
    world_size: int
    sequences_per_step: int  # train.batch_size x train.grad_accum x world_size
    torchrun: str
    paths: dict[str, str]  # config field -> the path the pods read
    files: list[str]
    commands: dict[str, str]
    warnings: list[str] = Field(default_factory=list)


def _mount(flag: str, value: str) -> PurePosixPath:
    path = PurePosixPath(value)
    if not path.is_absolute() or ".." in path.parts or str(path) != value.rstrip("/") or path == PurePosixPath("/"):
        raise BadInputError(f"{flag} {value!r}: expected an absolute path such as /data")
    for reserved in (CONFIG_DIR, SHM):
        if path == reserved or path.is_relative_to(reserved) or reserved.is_relative_to(path):
            raise BadInputError(f"{flag} {value}: overlaps {reserved}, which the pods mount themselves")
    return path


def _object_name(flag: str, value: str, pattern: re.Pattern[str] = _DNS1123_SUBDOMAIN) -> str:
    if not pattern.match(value):
        raise BadInputError(f"{flag} {value!r} is not a valid Kubernetes name")
    return value


def job_name(run_name: str) -> str:
    """The default Job name: the run's name and `-train` (`configs/cfg.yaml` -> Job `cfg-train`,
    ConfigMap `cfg-train-config`), short enough that pod hostnames JOB-INDEX stay DNS labels."""
    return dns_label(run_name)[: 63 - INDEX_ROOM - len(JOB_SUFFIX)].rstrip("-") + JOB_SUFFIX


def image_warnings(image: str) -> list[str]:
    """A warning when --image was left at its default, a name no registry serves."""
    if image != TrainJobOptions.model_fields["image"].default:
        return []
    return [f"--image {image} is lmctl's placeholder, not an image a cluster can pull: build one with lmctl "
            "installed (and a CUDA build of torch for GPUs), push it, and pass --image REGISTRY/NAME:TAG"]


class _Plan:
    """Options checked and the config's paths mapped onto the mounts; writes nothing."""

    def __init__(self, cfg: LmctlConfig, config_dir: Path, opts: TrainJobOptions) -> None:
        check_workload(opts.name, opts.namespace, opts.image, opts.cpu, opts.memory)
        self.opts, self.cfg = opts, cfg
        self.data, self.output = _mount("--data-mount", opts.data_mount), _mount("--output-mount", opts.output_mount)
        if self.data.is_relative_to(self.output) or self.output.is_relative_to(self.data):
            raise BadInputError(f"--data-mount {self.data} and --output-mount {self.output} must not overlap")
        for flag, value in (("--data-claim", opts.data_claim), ("--output-claim", opts.output_claim),
                            ("--tracking-secret", opts.tracking_secret)):
            _object_name(flag, value)
        _object_name("--tracking-secret-key", opts.tracking_secret_key, _SECRET_KEY)
        self.job = opts.name or job_name(str(cfg.output.run_name))
        if not self.job[0].isalpha():  # the headless Service's name is a DNS-1035 label
            raise BadInputError(f"Job name {self.job!r} must start with a letter", hint="pass --name")
        self.root = (opts.data_root or config_dir).expanduser().resolve()
        self.home = self.output / ".lmctl"
        self.nproc = opts.gpus_per_node or 1
        self.launch = LaunchOptions(nproc_per_node=self.nproc, nnodes=str(opts.nodes), max_restarts=opts.max_restarts,
                                    rdzv_endpoint=f"{self.job}-0.{self.job}:{RDZV_PORT}")
        self.paths: dict[str, str] = {}
        self.warnings: list[str] = image_warnings(opts.image)
        self.pod_config = self._pod_config()

    def _on_data_volume(self, field: str, path: Path) -> PurePosixPath:
        """A config path as the pods see it: under --data-root -> under --data-mount."""
        if path.is_relative_to(self.root):
            return self.data / path.relative_to(self.root).as_posix()
        if PurePosixPath(path).is_relative_to(self.data):  # the config already names the pods' paths
            return PurePosixPath(path)
        raise BadInputError(f"{field} {path} is outside --data-root {self.root}: the pods see only the data volume "
                            f"at {self.data}", hint="move it under --data-root, pass another --data-root, "
                            f"or give a path under {self.data}")

    def _pod_config(self) -> dict[str, Any]:
        """The config the pods train with: data on the data volume, runs on the output volume."""
        pod = self.cfg.model_copy(deep=True)
        if pod.data.train is None:
            raise BadInputError("data.train is not set: there is nothing to train on")
        for field in ("train", "validation"):
            path = getattr(pod.data, field)
            if path is not None:
                setattr(pod.data, field, Path(self._on_data_volume(f"data.{field}", path)))
                self.paths[f"data.{field}"] = str(getattr(pod.data, field))
        base = PurePosixPath(pod.model.base)
        if base.is_absolute() and (Path(base).is_relative_to(self.root) or base.is_relative_to(self.data)):
            pod.model.base = str(self._on_data_volume("model.base", Path(base)))
            self.paths["model.base"] = pod.model.base
        else:  # a catalog name, a hub id, or a path the image must provide
            self.warnings += base_model_warnings("model.base", pod.model.base,
                                                 f"LMCTL_HOME={self.home} on the output volume")
        pod.output.dir = Path(self.output)
        self.paths["output.dir"] = str(self.output)
        if pod.registry.tracking_uri is not None:
            self.warnings.append(f"registry.tracking_uri is not passed to the pods: they read MLFLOW_TRACKING_URI "
                                 f"from Secret {self.opts.tracking_secret} (key {self.opts.tracking_secret_key})")
            pod.registry.tracking_uri = None
        return pod.model_dump(mode="json", exclude=UNUSED_SECTIONS)

    def torchrun_args(self) -> list[str]:
        """torchrun's argv in every pod; HOST_WRAPPER adds the --rdzv-conf (is_host=1 on pod 0)."""
        return self.launch.torchrun_args([str(CONFIG_FILE), "--json"], self.job, with_rdzv_conf=False)

    def wrapper(self) -> str:
        return HOST_WRAPPER.format(rdzv_conf=self.launch.rdzv_conf(is_host="$host"))


class _Manifests:
    """The Kubernetes objects of a planned training job."""

    def __init__(self, plan: _Plan, config_text: str) -> None:
        self.plan, self.opts, self.job = plan, plan.opts, plan.job
        self.config_text = config_text
        self.labels = labels(self.job, TRACK)

    def _meta(self, name: str, **extra: Any) -> dict[str, Any]:
        return {"name": name, "namespace": self.opts.namespace, "labels": self.labels, **extra}

    def configmap(self) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": self._meta(f"{self.job}-config"),
                "data": {CONFIG_FILE.name: self.config_text}}

    def service(self) -> dict[str, Any]:
        # headless (no cluster IP): DNS answers with the pods themselves, JOB-i.JOB for pod i; not-ready
        # pods are published too, since the rendezvous runs before anything could be "ready"
        return {"apiVersion": "v1", "kind": "Service", "metadata": self._meta(self.job),
                "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": selector(self.job, TRACK),
                         "ports": [{"name": "rdzv", "port": RDZV_PORT, "targetPort": RDZV_PORT, "protocol": "TCP"}]}}

    def container(self) -> dict[str, Any]:
        gpus = self.opts.gpus_per_node
        requests: dict[str, Any] = {"cpu": self.opts.cpu, "memory": self.opts.memory}
        limits: dict[str, Any] = {"memory": self.opts.memory}
        if gpus:  # extended resources must be set in limits; requests default to limits
            limits["nvidia.com/gpu"] = requests["nvidia.com/gpu"] = gpus
        secret = {"name": self.opts.tracking_secret, "key": self.opts.tracking_secret_key}
        return {
            "name": "lmctl-train",
            "image": self.opts.image,
            "command": ["/bin/sh", "-c", self.plan.wrapper(), "torchrun"],
            "args": self.plan.torchrun_args(),
            "env": [{"name": "LMCTL_HOME", "value": str(self.plan.home)},
                    {"name": "MLFLOW_TRACKING_URI", "valueFrom": {"secretKeyRef": secret}},
                    {"name": SHARE_STORE_ENV, "value": "1"}],  # restarted workers must not reuse a stale store
            "ports": [{"name": "rdzv", "containerPort": RDZV_PORT, "protocol": "TCP"}],
            "resources": {"requests": requests, "limits": limits},
            "volumeMounts": [
                {"name": "config", "mountPath": str(CONFIG_DIR), "readOnly": True},
                {"name": "data", "mountPath": str(self.plan.data), "readOnly": True},
                {"name": "output", "mountPath": str(self.plan.output)},
                {"name": "dshm", "mountPath": str(SHM)},  # NCCL and DataLoader workers share memory here
            ],
            # no runAsNonRoot, unlike serving: the output volume must be writable by the image's user,
            # and a freshly provisioned volume is usually root's
            "securityContext": {"allowPrivilegeEscalation": False},
        }

    def job_doc(self) -> dict[str, Any]:
        nodes = self.opts.nodes
        backoff = 2 * nodes if self.opts.backoff_limit is None else self.opts.backoff_limit
        digest = hashlib.sha256(self.config_text.encode("utf-8")).hexdigest()
        return {
            "apiVersion": "batch/v1", "kind": "Job",
            "metadata": self._meta(self.job, annotations={"lmctl.dev/config-sha256": digest}),
            "spec": {
                "completionMode": "Indexed", "completions": nodes, "parallelism": nodes,
                "backoffLimit": backoff,
                # an evicted or preempted pod is replaced without using up the backoff limit
                "podFailurePolicy": {"rules": [{"action": "Ignore", "onPodConditions": [
                    {"type": "DisruptionTarget", "status": "True"}]}]},  # status: required before 1.31
                "template": {
                    "metadata": {"labels": self.labels, "annotations": {"lmctl.dev/config-sha256": digest}},
                    "spec": {
                        "subdomain": self.job,  # = the headless Service: pod i is JOB-i.JOB
                        "restartPolicy": "Never",  # podFailurePolicy needs it; the Job replaces failed pods
                        "affinity": self.one_pod_per_machine(),
                        "containers": [self.container()],
                        "volumes": [
                            {"name": "config", "configMap": {"name": f"{self.job}-config"}},
                            {"name": "data", "persistentVolumeClaim": {"claimName": self.opts.data_claim,
                                                                      "readOnly": True}},
                            {"name": "output", "persistentVolumeClaim": {"claimName": self.opts.output_claim}},
                            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
                        ],
                    },
                },
            },
        }

    def one_pod_per_machine(self) -> dict[str, Any]:
        """Required anti-affinity against the Job's own pods per hostname (why: module docstring)."""
        term = {"labelSelector": {"matchLabels": selector(self.job, TRACK)}, "topologyKey": HOSTNAME_TOPOLOGY}
        return {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [term]}}

    def documents(self) -> dict[str, dict[str, Any]]:
        return {"configmap.yaml": self.configmap(), "service.yaml": self.service(), "job.yaml": self.job_doc()}


def _commands(plan: _Plan, out: Path) -> dict[str, str]:
    ns, job, opts = f"kubectl -n {plan.opts.namespace}", plan.job, plan.opts
    pods = ",".join(f"{k}={v}" for k, v in selector(job, TRACK).items())
    return {
        "secret": f"{ns} create secret generic {opts.tracking_secret} "
                  f"--from-literal={opts.tracking_secret_key}=http://MLFLOW-SERVER:5000",
        "apply": f"kubectl apply -k {shlex.quote(str(out))}",
        "logs": f"{ns} logs -f -l {pods} --prefix --max-log-requests={max(opts.nodes, 5)}",
        "status": f"{ns} get job/{job} --watch",
        "delete": f"kubectl delete -k {shlex.quote(str(out))}",
    }


def emit_job(cfg: LmctlConfig, config_dir: Path, target: str, out: Path | None, opts: TrainJobOptions,
             force: bool = False) -> TrainJobResult:
    """Check everything, render the manifests into a staging dir beside `out`, rename it into place."""
    if target not in EMIT_TARGETS:
        raise BadInputError(f"--emit {target!r}: expected one of {', '.join(EMIT_TARGETS)}")
    if out is None:
        raise BadInputError("--emit needs --out DIR")
    plan = _Plan(cfg, config_dir, opts)
    atomic.require_empty_output(out, force)
    final = Path(os.path.abspath(out))
    header = f"# lmctl train --emit {target}: paths are the pods' (lmctl {__version__})\n"
    manifests = _Manifests(plan, header + dump(plan.pod_config))
    docs = manifests.documents()
    with atomic.staging_dir(final) as stage:
        for filename, doc in docs.items():
            (stage / filename).write_text(dump(doc), encoding="utf-8")
        kustomization = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                         "namespace": opts.namespace, "resources": list(docs)}
        (stage / "kustomization.yaml").write_text(dump(kustomization), encoding="utf-8")
        make_readable(stage)
    for warning in plan.warnings:
        log.warning("warning: %s", warning)
    world = opts.nodes * plan.nproc
    return TrainJobResult(
        out=str(final), job=plan.job, namespace=opts.namespace, nodes=opts.nodes, gpus_per_node=opts.gpus_per_node,
        world_size=world, sequences_per_step=rows_per_step(cfg, world),
        torchrun=shlex.join(["torchrun", *plan.torchrun_args()]), paths=plan.paths, files=listed_files(final),
        commands=_commands(plan, final), warnings=plan.warnings)
