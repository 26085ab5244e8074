"""Rendered Kubernetes manifests checked by `kubernetes-validate --strict`, the validator users run,
and the canary HTTPRoute by the `jsonschema` library against Gateway API's published v1 schema.

kubernetes-validate ships the Kubernetes JSON schemas inside its package, so this runs offline.
kubernetes-validate has no schema for CRDs, so the HTTPRoute schema is vendored:
tests/assets/gateway-api/ (Gateway API v1.0.0, from an npm package; its README and
scripts/gateway_api_schema.py say which and how to refresh it). Each check is also shown to fail
on a broken copy, so a validator that silently passes nothing cannot make these tests green.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

K8S_VERSION = "1.37.0"
HTTPROUTE_SCHEMA = Path(__file__).parent / "assets" / "gateway-api" / "httproute-v1.schema.json"
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
                                           "service-canary.yaml")]
    done = kubernetes_validate(*files)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("INFO") == len(files)  # one "... is valid" line per file

    deployment = yaml.safe_load(files[0].read_text())
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}  # a typo a person could make
    broken = manifests.parent / "broken-deployment.yaml"
    broken.write_text(yaml.safe_dump(deployment))
    refused = kubernetes_validate(broken)
    assert refused.returncode != 0 and "readinesProbe" in refused.stdout + refused.stderr


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


@pytest.fixture(scope="module")
def httproute_errors() -> Any:
    """A function listing the Gateway API v1 schema's complaints about an HTTPRoute document."""
    import jsonschema
    import kubernetes_validate
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    schema = forbid_unknown_fields(json.loads(HTTPROUTE_SCHEMA.read_text(encoding="utf-8")))
    # `metadata` is checked against Kubernetes' own ObjectMeta, from the schemas kubernetes-validate ships
    schemas = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{K8S_VERSION}-local-strict"
    definitions = Resource.from_contents(json.loads((schemas / "_definitions.json").read_text(encoding="utf-8")))
    meta = Resource.from_contents({"$ref": f"{definitions.id()}#/$defs/{OBJECT_META}"},
                                  default_specification=DRAFT202012)
    registry = Registry().with_resources([(definitions.id(), definitions), (OBJECT_META, meta)])
    validator = jsonschema.Draft202012Validator(schema, registry=registry,
                                                format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    return lambda doc: sorted(f"{e.json_path}: {e.message}" for e in leaves(validator.iter_errors(doc)))


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
    route = copy.deepcopy(yaml.safe_load((manifests / "httproute.yaml").read_text()))
    parent = route
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
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
