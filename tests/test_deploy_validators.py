"""Rendered Kubernetes manifests checked by `kubernetes-validate --strict`, the validator users run,
the canary HTTPRoute and the alerts' PrometheusRule by the `jsonschema` library against Gateway API's
and prometheus-operator's published v1 schemas, and the alert rule file by `promtool check rules`.

kubernetes-validate ships the Kubernetes JSON schemas inside its package, so this runs offline.
kubernetes-validate has no schema for CRDs, so the HTTPRoute and PrometheusRule schemas are vendored:
tests/assets/gateway-api/ (Gateway API v1.0.0) and tests/assets/prometheus-operator/ (v0.57.0), each
from an npm package; their READMEs and scripts/gateway_api_schema.py, scripts/prometheus_rule_schema.py
say which and how to refresh them. Each check is also shown to fail
on a broken copy, so a validator that silently passes nothing cannot make these tests green.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

K8S_VERSION = "1.37.0"
HTTPROUTE_SCHEMA = Path(__file__).parent / "assets" / "gateway-api" / "httproute-v1.schema.json"
PROMETHEUS_RULE_SCHEMA = Path(__file__).parent / "assets" / "prometheus-operator" / "prometheusrule-v1.schema.json"
OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"  # the schema's $ref for `metadata`


@pytest.fixture(scope="module")
def manifests(tmp_path_factory: pytest.TempPathFactory, sealed_checkpoint: Path) -> Path:
    """`lmctl deploy --target kubernetes` with a canary, from two registered versions."""
    from lmctl.cli import main

    root = tmp_path_factory.mktemp("k8s")
    ckpt = sealed_checkpoint
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMCTL_HOME", str(root / "home"))
        assert main(["register", str(ckpt), "--name", "tiny", "--alias", "production"]) == 0
        assert main(["register", str(ckpt), "--name", "tiny"]) == 0
        assert main(["deploy", "models:/tiny@production", "--target", "kubernetes", "--out", str(root / "out"),
                     "--canary", "models:/tiny/2", "--canary-weight", "0.25", "--gpus", "1"]) == 0
    return root / "out"


def kubernetes_validate(*files: Path, version: str = K8S_VERSION) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "-k", version, *map(str, files)],
                          capture_output=True, text=True, timeout=120)


def test_deployments_and_services_pass_strict_validation(manifests: Path) -> None:
    files = [manifests / name for name in ("deployment.yaml", "service.yaml", "deployment-canary.yaml",
                                           "service-canary.yaml", "hpa.yaml", "pdb.yaml")]
    done = kubernetes_validate(*files)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("INFO") == len(files)  # one "... is valid" line per file

    deployment = yaml.safe_load(files[0].read_text())
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}  # a typo a person could make
    broken = manifests.parent / "broken-deployment.yaml"
    broken.write_text(yaml.safe_dump(deployment))
    refused = kubernetes_validate(broken)
    assert refused.returncode != 0 and "readinesProbe" in refused.stdout + refused.stderr


@pytest.mark.parametrize(("name", "path", "value", "complaint"), [
    ("hpa.yaml", ("spec", "maxReplicas"), "four", "maxReplicas"),
    ("hpa.yaml", ("spec", "metrics", 0, "resource", "target", "averageUtilisation"), 70, "averageUtilisation"),
    ("pdb.yaml", ("spec", "maxUnavailble"), 1, "maxUnavailble"),
    ("pdb.yaml", ("spec", "selector", "matchLabels"), ["app"], "matchLabels"),
])
def test_autoscaler_and_disruption_budget_refused_when_broken(manifests: Path, name: str, path: tuple[Any, ...],
                                                              value: Any, complaint: str) -> None:
    doc = _set(yaml.safe_load((manifests / name).read_text()), path, value)
    broken = manifests.parent / f"broken-{name}"
    broken.write_text(yaml.safe_dump(doc))
    refused = kubernetes_validate(broken)
    assert refused.returncode != 0 and complaint in refused.stdout + refused.stderr


def _set(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    """A copy of `doc` with the item at `path` set to `value`."""
    doc = copy.deepcopy(doc)
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return doc


def test_queue_depth_autoscaler_from_the_docs_passes_strict_validation(manifests: Path) -> None:
    """docs/operations.md's custom-metric `metrics:` block, put into the rendered HPA as it says."""
    import re

    page = (Path(__file__).parent.parent / "docs" / "operations.md").read_text(encoding="utf-8")
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", page, re.S) if "type: Pods" in b)
    hpa = yaml.safe_load((manifests / "hpa.yaml").read_text())
    hpa["spec"]["metrics"] = yaml.safe_load(block)["metrics"]
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "lmctl_queue_depth"
    path = manifests.parent / "hpa-queue-depth.yaml"
    path.write_text(yaml.safe_dump(hpa))
    done = kubernetes_validate(path)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (apt-get install prometheus)")
def test_rendered_alert_rules_pass_promtool(manifests: Path) -> None:
    done = subprocess.run(["promtool", "check", "rules", str(manifests / "alerts.rules.yaml")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "SUCCESS: 10 rules found" in done.stdout, done.stdout + done.stderr


def forbid_unknown_fields(schema: Any) -> Any:
    """The schema with `additionalProperties: false` on every object that lists its properties.

    A CRD schema leaves unknown fields open because the API server prunes them, but kubectl (1.27+,
    --validate=strict by default) asks the server to refuse them instead, which is what a user
    applying these files meets; kubernetes-validate --strict does the same to its schemas."""
    if isinstance(schema, list):
        return [forbid_unknown_fields(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: forbid_unknown_fields(value) if key not in ("default", "enum") else value
           for key, value in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def crd_errors(schema_path: Path) -> Any:
    """A function listing a vendored CRD schema's complaints about a document."""
    import jsonschema
    import kubernetes_validate
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    schema = forbid_unknown_fields(json.loads(schema_path.read_text(encoding="utf-8")))
    # `metadata` is checked against Kubernetes' own ObjectMeta, from the schemas kubernetes-validate ships
    schemas = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{K8S_VERSION}-local-strict"
    definitions = Resource.from_contents(json.loads((schemas / "_definitions.json").read_text(encoding="utf-8")))
    meta = Resource.from_contents({"$ref": f"{definitions.id()}#/$defs/{OBJECT_META}"},
                                  default_specification=DRAFT202012)
    registry = Registry().with_resources([(definitions.id(), definitions), (OBJECT_META, meta)])
    validator = jsonschema.Draft202012Validator(schema, registry=registry,
                                                format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    return lambda doc: sorted(f"{e.json_path}: {e.message}" for e in leaves(validator.iter_errors(doc)))


@pytest.fixture(scope="module")
def httproute_errors() -> Any:
    """The Gateway API v1 schema's complaints about an HTTPRoute document."""
    return crd_errors(HTTPROUTE_SCHEMA)


@pytest.fixture(scope="module")
def prometheus_rule_errors() -> Any:
    """prometheus-operator's v1 schema's complaints about a PrometheusRule document."""
    return crd_errors(PROMETHEUS_RULE_SCHEMA)


def leaves(errors: Any) -> Any:
    """The innermost errors: `metadata` is oneOf [ObjectMeta, null], whose own message names neither."""
    for error in errors:
        yield from leaves(error.context) if error.context else [error]


def test_httproute_passes_the_gateway_api_v1_schema(manifests: Path, httproute_errors: Any) -> None:
    route = yaml.safe_load((manifests / "httproute.yaml").read_text())
    assert httproute_errors(route) == []
    assert (route["apiVersion"], route["kind"]) == ("gateway.networking.k8s.io/v1", "HTTPRoute")
    assert route["metadata"]["name"] == "tiny" and route["metadata"]["namespace"]
    backends = route["spec"]["rules"][0]["backendRefs"]
    assert [b["weight"] for b in backends] == [75, 25]  # --canary-weight 0.25


@pytest.mark.parametrize(("path", "value", "complaint"), [
    (("spec", "rules", 0, "backendRefs", 1, "weight"), 1_000_001, "greater than the maximum"),
    (("spec", "rules", 0, "backendRefs", 1, "wieght"), 25, "Additional properties"),  # a typo: unknown field
    (("spec", "rules", 0, "matches", 0, "path", "type"), "Prefix", "is not one of"),
    (("spec", "parentRefs", 0, "name"), "", "should be non-empty"),
    (("metadata", "labels", "app.kubernetes.io/name"), 7, "is not of type 'string'"),  # ObjectMeta's own rules
    (("metadata", "lables"), {}, "Additional properties"),
    (("kind",), "HTTPRoutes", "is not one of"),
    (("apiVersion",), "gateway.networking.k8s.io/v1beta2", "is not one of"),
])
def test_gateway_api_schema_refuses_a_broken_route(manifests: Path, httproute_errors: Any, path: tuple[Any, ...],
                                                   value: Any, complaint: str) -> None:
    route = _set(yaml.safe_load((manifests / "httproute.yaml").read_text()), path, value)
    errors = httproute_errors(route)
    assert errors and any(complaint in e for e in errors), errors


@pytest.fixture(scope="module")
def rollout_manifests(tmp_path_factory: pytest.TempPathFactory, sealed_checkpoint: Path) -> Path:
    """`lmctl deploy --target kubernetes --canary-steps`: one HTTPRoute per gradual-rollout step."""
    from lmctl.cli import main

    root = tmp_path_factory.mktemp("k8s-rollout")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMCTL_HOME", str(root / "home"))
        assert main(["register", str(sealed_checkpoint), "--name", "tiny", "--alias", "production"]) == 0
        assert main(["register", str(sealed_checkpoint), "--name", "tiny"]) == 0
        assert main(["deploy", "models:/tiny@production", "--target", "kubernetes", "--out", str(root / "out"),
                     "--canary", "models:/tiny/2", "--canary-steps", "0.05,0.25,0.5,1.0"]) == 0
        for bad in (["--canary-steps", "0.055,1.0"], ["--canary-steps", "0.5,0.25"],
                    ["--canary-steps", "0.5,1.0", "--canary-weight", "0.5"]):
            assert main(["deploy", "models:/tiny@production", "--target", "kubernetes", "--out",
                         str(root / "refused"), "--canary", "models:/tiny/2", *bad]) == 2, bad
    return root / "out"


def test_rollout_steps_render_one_valid_httproute_per_step(rollout_manifests: Path, httproute_errors: Any) -> None:
    routes = [yaml.safe_load((rollout_manifests / f"httproute-step-{n}.yaml").read_text()) for n in range(1, 5)]
    assert all(httproute_errors(route) == [] for route in routes)
    weights = [[b["weight"] for b in r["spec"]["rules"][0]["backendRefs"]] for r in routes]
    assert weights == [[95, 5], [75, 25], [50, 50], [0, 100]]
    assert {r["metadata"]["name"] for r in routes} == {"tiny"}  # one route whose weights each step replaces
    assert [r["metadata"]["annotations"]["lmctl.dev/rollout-step"] for r in routes] == ["1/4", "2/4", "3/4", "4/4"]
    assert yaml.safe_load((rollout_manifests / "httproute.yaml").read_text()) == routes[0]
    kustomization = yaml.safe_load((rollout_manifests / "kustomization.yaml").read_text())
    assert not any(name.startswith("httproute-step-") for name in kustomization["resources"])
    info = json.loads((rollout_manifests / "deploy.json").read_text())
    text = json.dumps(info)
    assert "httproute-step-4.yaml" in text and "lmctl promote tiny 2 --force" in text
    broken = copy.deepcopy(routes[3])
    broken["spec"]["rules"][0]["backendRefs"][1]["weight"] = -1
    assert any("less than the minimum" in e for e in httproute_errors(broken))


def test_prometheus_rule_passes_the_prometheus_operator_schema(manifests: Path, prometheus_rule_errors: Any) -> None:
    rule = yaml.safe_load((manifests / "prometheusrule.yaml").read_text())
    assert prometheus_rule_errors(rule) == []
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    file_groups = yaml.safe_load((manifests / "alerts.rules.yaml").read_text())["groups"]
    assert rule["spec"]["groups"] == file_groups  # one set of rules, two packagings
    assert all(r["labels"]["severity"] in ("page", "ticket") for g in file_groups for r in g["rules"])


@pytest.mark.parametrize(("path", "value", "complaint"), [
    (("spec", "groups", 0, "rules", 0, "expr"), None, "None is not of type 'string'"),
    (("spec", "groups", 0, "rules", 0, "labels", "severity"), 1, "is not of type 'string'"),
    (("spec", "groups", 0, "rules", 0, "annotaions"), {}, "Additional properties"),  # a typo: unknown field
    (("spec", "groups", 0, "name"), None, "is not of type 'string'"),
    (("spec", "group"), [], "Additional properties"),
    (("kind",), "PrometheusRules", "is not one of"),
    (("apiVersion",), "monitoring.coreos.com/v1beta1", "is not one of"),
    (("metadata", "labels", "app.kubernetes.io/name"), 7, "is not of type 'string'"),
])
def test_prometheus_operator_schema_refuses_a_broken_rule(manifests: Path, prometheus_rule_errors: Any,
                                                          path: tuple[Any, ...], value: Any, complaint: str) -> None:
    rule = _set(yaml.safe_load((manifests / "prometheusrule.yaml").read_text()), path, value)
    errors = prometheus_rule_errors(rule)
    assert errors and any(complaint in e for e in errors), errors
