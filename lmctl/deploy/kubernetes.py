"""`--target kubernetes`: manifests that run `lmctl serve` on a registry version.

    OUT/deployment.yaml, OUT/service.yaml                  the stable track
    OUT/deployment-canary.yaml, OUT/service-canary.yaml    with --canary
    OUT/httproute.yaml   Gateway API HTTPRoute splitting traffic by weight (with --canary)
    OUT/httproute-step-N.yaml   with --canary-steps: the same HTTPRoute at each step's weights
    OUT/hpa.yaml, OUT/pdb.yaml   autoscaler and disruption budget of the stable track (lmctl.deploy.autoscale)
    OUT/kustomization.yaml, OUT/deploy.json
    OUT/alerts.rules.yaml, OUT/prometheusrule.yaml   SLO alerting rules (lmctl.deploy.alerts); the
                         PrometheusRule is applied on its own: it needs the prometheus-operator CRD

Pods pull the checkpoint from the MLflow registry (a `models:/` reference is required:
a local path does not exist inside a pod) and `lmctl serve` verifies its lock before it
binds the port. API keys come from a Secret through LMCTL_API_KEYS. Readiness is
`/readyz` (200 only once a warm-up generation ran), liveness `/healthz`; a startup probe covers model download and load so that
liveness does not kill a pod that is still loading. Canary traffic is split with weighted
backendRefs of a Gateway API HTTPRoute, the vendor-neutral way to do it.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import yaml

from lmctl.deploy import alerts
from lmctl.deploy.autoscale import autoscaler, disruption_budget
from lmctl.deploy.bundle import Rendered, Source, load_source, require_registry_ref
from lmctl.deploy.options import DeployOptions
from lmctl.deploy.slo import load_slo
from lmctl.errors import BadInputError

CONTAINER_PORT_NAME = "http"
SERVICE_PORT = 80
HOME_MOUNT = "/var/lib/lmctl"
SECRET_KEY = "api-keys"
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# Kubernetes resource.Quantity, e.g. 500m, 2, 1.5, 4Gi, 512M
_QUANTITY = re.compile(r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[mkMGTPE]|[eE][+-]?[0-9]+)?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
CANARY_SUFFIX = "-canary"


def dns_label(raw: str) -> str:
    """A DNS-1123 label from a registry name: lowercase, other characters -> '-', at most 63
    characters less room for the canary suffix."""
    label = re.sub(r"[^a-z0-9-]+", "-", raw.lower()).strip("-")
    label = re.sub(r"-{2,}", "-", label)[: 63 - len(CANARY_SUFFIX)].rstrip("-")
    if not _DNS1123_LABEL.match(label):
        raise BadInputError(f"cannot derive a Kubernetes name from {raw!r}", hint="pass --name (a DNS-1123 label)")
    return label


def canary_percent(share: float) -> int:
    """The canary's HTTPRoute weight out of 100 for a 0-1 share of traffic, the unit `lmctl serve
    --canary-weight` uses too. Route weights are integers, so the share is taken in hundredths."""
    if share > 1:  # this flag of deploy used to be a percent: say so rather than guess
        raise BadInputError(f"--canary-weight {share:g}: the canary's share of traffic is a fraction in (0, 1), "
                            "as for lmctl serve", hint=f"for {share:g}% give {share / 100:g}")
    percent = round(share * 100)
    if not 1 <= percent <= 99 or abs(share * 100 - percent) > 1e-6:
        raise BadInputError(f"--canary-weight {share:g}: expected a share between 0.01 and 0.99 in hundredths "
                            "(HTTPRoute weights are whole percents here)")
    return percent


def step_percent(share: float) -> int:
    """A rollout step's canary weight out of 100: whole percents, 1.0 (all traffic) included."""
    percent = round(share * 100)
    if abs(share * 100 - percent) > 1e-6:
        raise BadInputError(f"--canary-steps {share:g}: HTTPRoute weights are whole percents here; give hundredths")
    return percent


def _quantity(flag: str, value: str) -> None:
    if not _QUANTITY.match(value):
        raise BadInputError(f"--{flag} {value!r} is not a Kubernetes quantity", hint="e.g. 500m, 2, 4Gi")


def labels(app: str, track: str, version: str | None = None) -> dict[str, str]:
    """The labels of every object lmctl renders; `track` is stable/canary for serving, train for a training Job."""
    out = {"app.kubernetes.io/name": app, "app.kubernetes.io/managed-by": "lmctl", "lmctl.dev/track": track}
    if version and _LABEL_VALUE.match(version):
        out["app.kubernetes.io/version"] = version
    return out


def selector(app: str, track: str) -> dict[str, str]:
    """What a Service (or a Deployment) selects its pods by: the app and its track."""
    return {"app.kubernetes.io/name": app, "lmctl.dev/track": track}


def check_workload(name: str | None, namespace: str, image: str, cpu: str, memory: str) -> None:
    """The options every rendered workload shares, refused (exit 2) before anything is written."""
    if name is not None and dns_label(name) != name:
        raise BadInputError(f"--name {name!r} is not a DNS-1123 label", hint=f"e.g. {dns_label(name)}")
    if not _DNS1123_LABEL.match(namespace):
        raise BadInputError(f"--namespace {namespace!r} is not a DNS-1123 label")
    _quantity("cpu", cpu)
    _quantity("memory", memory)
    if not image or any(c.isspace() for c in image):
        raise BadInputError(f"--image {image!r} is not an image reference")


class _NoAliasDumper(yaml.SafeDumper):
    """Shared dicts (labels, probes) are written out in full, not as YAML anchors/aliases, and
    multi-line strings (a ConfigMap's file) as literal blocks a person can read."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)


_NoAliasDumper.add_representer(str, _str)


def dump(doc: dict[str, Any]) -> str:
    return yaml.dump(doc, Dumper=_NoAliasDumper, sort_keys=False)


def base_model_warnings(label: str, base: str, home: str = "LMCTL_HOME") -> list[str]:
    """The pod loads the base model `base`; say when that cannot work as is (`home`: where the
    pod's LMCTL_HOME is, which is where a catalog model must have been pulled)."""
    from lmctl.models import CATALOG

    if base in CATALOG:
        return [f"{label}: base model {base!r} is a catalog model; it must have been pulled "
                f"(lmctl models pull {base}) under {home} or the pod cannot load it"]
    if base.startswith("/"):
        return [f"{label}: base model is the local path {base}; the image must provide it at that path"]
    return []


def _base_warnings(source: Source) -> list[str]:
    return base_model_warnings(source.ref, source.manifest.base_model.id, "the image's LMCTL_HOME")


class Renderer:
    def __init__(self, opts: DeployOptions, final: Path) -> None:
        self.opts, self.final = opts, final
        check_workload(opts.name, opts.namespace, opts.image, opts.cpu, opts.memory)
        self.cpu, self.memory = opts.cpu, opts.memory
        if opts.canary_weight is not None and opts.canary is None:
            raise BadInputError("--canary-weight needs --canary MODEL_REF")
        if opts.canary_steps is not None and (opts.canary is None or opts.canary_weight is not None):
            raise BadInputError("--canary-steps needs --canary MODEL_REF and replaces --canary-weight")
        self.steps = [step_percent(s) for s in opts.canary_steps or []]
        self.share = opts.canary_steps[0] if opts.canary_steps else 0.1 if opts.canary_weight is None else opts.canary_weight
        self.weight = self.steps[0] if self.steps else canary_percent(self.share)
        if opts.canary is not None:
            require_registry_ref(opts.canary, "--canary")
        self.max_replicas = max(4, opts.replicas) if opts.max_replicas is None else opts.max_replicas
        if self.max_replicas < opts.replicas:
            raise BadInputError(f"--max-replicas {self.max_replicas} is below --replicas {opts.replicas}")
        # minReplicas must be >= 1; equal bounds leave nothing to scale
        self.autoscale = 1 <= opts.replicas < self.max_replicas
        self.slo = load_slo(opts.slo)

    def prepare(self, source: Source) -> None:
        require_registry_ref(source.ref, "MODEL_REF")
        self.stable = source
        self.app = self.opts.name or dns_label(source.display_name)
        self.canary = load_source(self.opts.canary) if self.opts.canary is not None else None
        self.warnings = self._tracking_warnings() + _base_warnings(source)
        if self.canary is not None and self.canary.manifest.base_model.id != source.manifest.base_model.id:
            self.warnings += _base_warnings(self.canary)

    def _tracking_uri(self) -> str | None:
        from lmctl.tracking import tracking_uri

        return self.opts.tracking_uri or (None if tracking_uri().startswith("sqlite:") else tracking_uri())

    def _tracking_warnings(self) -> list[str]:
        if self._tracking_uri():
            return []
        return ["the registry is the embedded sqlite store of this machine, which pods cannot reach: "
                "pass --tracking-uri (an MLflow server) or set MLFLOW_TRACKING_URI in the Deployment"]

    def container(self, source: Source) -> dict[str, Any]:
        env: list[dict[str, Any]] = [
            {"name": "LMCTL_HOME", "value": HOME_MOUNT},
            {"name": "LMCTL_API_KEYS", "valueFrom": {"secretKeyRef": {"name": f"{self.app}-api-keys",
                                                                      "key": SECRET_KEY}}},
        ]
        if self._tracking_uri():
            env.append({"name": "MLFLOW_TRACKING_URI", "value": self._tracking_uri()})
        limits: dict[str, Any] = {"memory": self.memory}
        requests: dict[str, Any] = {"cpu": self.cpu, "memory": self.memory}
        if self.opts.gpus:
            # extended resources must be set in limits; requests default to limits
            limits["nvidia.com/gpu"] = requests["nvidia.com/gpu"] = self.opts.gpus
        probe = {"httpGet": {"path": "/healthz", "port": CONTAINER_PORT_NAME}}
        return {
            "name": "lmctl-serve",
            "image": self.opts.image,
            "args": ["serve", source.ref, "--host", "0.0.0.0", "--port", str(self.opts.port)],
            "ports": [{"name": CONTAINER_PORT_NAME, "containerPort": self.opts.port, "protocol": "TCP"}],
            "env": env,
            "resources": {"requests": requests, "limits": limits},
            "startupProbe": {**probe, "periodSeconds": 10, "failureThreshold": 60},
            "readinessProbe": {"httpGet": {"path": "/readyz", "port": CONTAINER_PORT_NAME}, "periodSeconds": 5,
                               "failureThreshold": 3},
            "livenessProbe": {**probe, "periodSeconds": 20, "failureThreshold": 3},
            "volumeMounts": [{"name": "lmctl-home", "mountPath": HOME_MOUNT}],
            "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True},
        }

    def deployment(self, name: str, track: str, source: Source, replicas: int | None) -> dict[str, Any]:
        """`replicas` None: the autoscaler owns the count (a fixed one would be reset on every apply)."""
        pod_labels = labels(self.app, track, source.registry_version)
        annotations = {"lmctl.dev/model-ref": source.ref, "lmctl.dev/manifest-sha256": source.manifest_sha256,
                       "lmctl.dev/resolved-version": source.registry_version or ""}
        return {
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": self.opts.namespace, "labels": pod_labels,
                         "annotations": annotations},
            "spec": {
                **({} if replicas is None else {"replicas": replicas}),
                "selector": {"matchLabels": selector(self.app, track)},
                "template": {
                    "metadata": {"labels": pod_labels, "annotations": annotations},
                    "spec": {"containers": [self.container(source)],
                             "volumes": [{"name": "lmctl-home", "emptyDir": {}}],
                             "terminationGracePeriodSeconds": 30},
                },
            },
        }

    def service(self, name: str, track: str, source: Source) -> dict[str, Any]:
        return {
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": self.opts.namespace,
                         "labels": labels(self.app, track, source.registry_version)},
            "spec": {"selector": selector(self.app, track),
                     "ports": [{"name": CONTAINER_PORT_NAME, "port": SERVICE_PORT,
                                "targetPort": CONTAINER_PORT_NAME, "protocol": "TCP"}]},
        }

    def route(self, weight: int, step: int | None = None) -> dict[str, Any]:
        """The HTTPRoute with `weight` percent to the canary; a rollout step's copy says which step it is."""
        canary = self.app + CANARY_SUFFIX
        metadata: dict[str, Any] = {"name": self.app, "namespace": self.opts.namespace,
                                    "labels": {"app.kubernetes.io/name": self.app, "app.kubernetes.io/managed-by": "lmctl"}}
        if step is not None:
            metadata["annotations"] = {"lmctl.dev/rollout-step": f"{step}/{len(self.steps)}",
                                       "lmctl.dev/canary-percent": str(weight)}
        return {
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": metadata,
            "spec": {
                "parentRefs": [{"name": self.opts.gateway}],
                "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                           "backendRefs": [{"name": self.app, "port": SERVICE_PORT, "weight": 100 - weight},
                                           {"name": canary, "port": SERVICE_PORT, "weight": weight}]}],
            },
        }

    def documents(self) -> dict[str, dict[str, Any]]:
        replicas = None if self.autoscale else self.opts.replicas
        docs = {"deployment.yaml": self.deployment(self.app, "stable", self.stable, replicas),
                "service.yaml": self.service(self.app, "stable", self.stable)}
        stable_labels = labels(self.app, "stable", self.stable.registry_version)
        if self.autoscale:
            docs["hpa.yaml"] = autoscaler(self.app, self.opts.namespace, stable_labels, self.opts.replicas,
                                          self.max_replicas, self.opts.target_cpu)
        if self.opts.replicas >= 1:
            docs["pdb.yaml"] = disruption_budget(self.app, self.opts.namespace, stable_labels,
                                                 selector(self.app, "stable"), self.opts.max_unavailable)
        if self.canary is not None:
            name = self.app + CANARY_SUFFIX
            docs["deployment-canary.yaml"] = self.deployment(name, "canary", self.canary, self.opts.canary_replicas)
            docs["service-canary.yaml"] = self.service(name, "canary", self.canary)
            docs["httproute.yaml"] = self.route(self.weight, 1 if self.steps else None)
        return docs

    def step_routes(self) -> dict[str, dict[str, Any]]:
        """httproute-step-N.yaml per rollout step: applied in turn, outside the kustomization (one route, many weights)."""
        return {f"httproute-step-{n}.yaml": self.route(weight, n) for n, weight in enumerate(self.steps, start=1)}

    def _rollout(self, commands: dict[str, str]) -> dict[str, Any]:
        """Each step's file and share; its `kubectl apply` joins the commands, and so does the final promote."""
        assert self.canary is not None and self.opts.canary_steps is not None
        steps = []
        for n, (share, weight) in enumerate(zip(self.opts.canary_steps, self.steps), start=1):
            name = f"httproute-step-{n}.yaml"
            commands[f"rollout_step_{n}"] = f"kubectl apply -f {shlex.quote(str(self.final / name))}"
            steps.append({"step": n, "share": share, "route_percent": weight, "file": name})
        commands["promote"] = (f"lmctl promote {self.canary.registry_name} {self.canary.registry_version} --force "
                               "--reason 'gradual rollout completed'")
        return {"steps": steps, "promote": commands["promote"]}

    def render(self, stage: Path) -> Rendered:
        docs = self.documents()
        for filename, doc in {**docs, **self.step_routes()}.items():
            (stage / filename).write_text(dump(doc), encoding="utf-8")
        kustomization = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                         "namespace": self.opts.namespace, "resources": list(docs)}
        (stage / "kustomization.yaml").write_text(dump(kustomization), encoding="utf-8")
        # the model name and version `lmctl serve` reports for a models:/ reference
        model, version = self.stable.registry_name or self.app, self.stable.registry_version or ""
        rule_labels = {"app.kubernetes.io/name": self.app, "app.kubernetes.io/managed-by": "lmctl"}
        (stage / alerts.RULES_FILE).write_text(dump(alerts.rules_file(self.slo, model, self.app, version)), encoding="utf-8")
        (stage / alerts.PROMETHEUS_RULE_FILE).write_text(
            dump(alerts.prometheus_rule(self.slo, model, self.app, self.opts.namespace, rule_labels, version)), encoding="utf-8")
        out = shlex.quote(str(self.final))
        commands = {
            "secret": (f"kubectl -n {self.opts.namespace} create secret generic {self.app}-api-keys "
                       f"--from-literal={SECRET_KEY}=KEY1,KEY2"),
            "apply": f"kubectl apply -k {out}",
            "status": f"kubectl -n {self.opts.namespace} rollout status deployment/{self.app}",
            "alerts": f"kubectl apply -f {shlex.quote(str(self.final / alerts.PROMETHEUS_RULE_FILE))}",
            "check_alerts": f"promtool check rules {shlex.quote(str(self.final / alerts.RULES_FILE))}",
        }
        info: dict[str, Any] = {"app": self.app, "namespace": self.opts.namespace, "image": self.opts.image,
                                "resources": list(docs), "alerts": alerts.summary(self.slo, model),
                                "autoscaler": ({"min_replicas": self.opts.replicas, "max_replicas": self.max_replicas,
                                                "target_cpu_percent": self.opts.target_cpu}
                                               if self.autoscale else None)}
        if self.canary is not None:
            info["canary"] = {"model_ref": self.canary.ref, "registry_version": self.canary.registry_version,
                              "weight": self.share, "route_percent": self.weight, "gateway": self.opts.gateway}
        if self.steps:
            info["rollout"] = self._rollout(commands)
        return Rendered(commands=commands, warnings=self.warnings, target_info={"kubernetes": info})
