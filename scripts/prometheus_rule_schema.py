"""Re-extract the prometheus-operator PrometheusRule schema that tests/test_deploy_validators.py checks against.

    tests/assets/prometheus-operator/prometheusrule-v1.schema.json

No Python package ships the prometheus-operator CRDs, and the tests cannot reach GitHub. The npm
package @kubernetes-models/prometheus-operator 4.0.0 is the newest that carries the CRD schema as
a JSON object literal (`const schema = {...};` in `package/monitoring.coreos.com/v1/PrometheusRule.js`;
4.4.x on ship only ajv-compiled JavaScript). @kubernetes-models/crd-generate built it from
prometheus-operator v0.57.0's `example/prometheus-operator-crd-full/monitoring.coreos.com_prometheusrules.yaml`
(package.json's "crd-generate" inputs): descriptions dropped, `nullable: true` on optional fields,
`apiVersion`/`kind` pinned by `enum`, `metadata` a `$ref` to ObjectMeta. The extraction is
scripts/gateway_api_schema.py's (`literal_schema`, `write_asset`).

    python scripts/prometheus_rule_schema.py            # runs `npm pack` (npm registry), writes the asset
    python scripts/prometheus_rule_schema.py --tarball kubernetes-models-prometheus-operator-4.0.0.tgz
"""

from __future__ import annotations

from pathlib import Path

from gateway_api_schema import REPO, literal_schema, write_asset

PACKAGE, VERSION = "@kubernetes-models/prometheus-operator", "4.0.0"
MEMBER = "package/monitoring.coreos.com/v1/PrometheusRule.js"
OUT = REPO / "tests" / "assets" / "prometheus-operator" / "prometheusrule-v1.schema.json"


def extract(tarball: Path) -> dict:
    meta, schema = literal_schema(tarball, PACKAGE, VERSION, MEMBER)
    assert schema["properties"]["apiVersion"]["enum"] == ["monitoring.coreos.com/v1"]
    crd = next(url for url in meta["crd-generate"]["input"] if url.endswith("_prometheusrules.yaml"))
    return {"$comment": (f"PrometheusRule monitoring.coreos.com/v1 openAPIV3Schema, as shipped in the npm package "
                         f"{PACKAGE}@{VERSION} ({MEMBER}), generated from {crd}. Written by "
                         "scripts/prometheus_rule_schema.py; do not edit."),
            **schema}


if __name__ == "__main__":
    write_asset(__doc__.splitlines()[0], extract, OUT, PACKAGE, VERSION)
