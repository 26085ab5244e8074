"""Re-extract the prometheus-operator PrometheusRule schema that tests/test_deploy_validators.py checks against.

    tests/assets/prometheus-operator/prometheusrule-v1.schema.json

No Python package ships the prometheus-operator CRDs, and the tests cannot reach GitHub. The npm
package @kubernetes-models/prometheus-operator 4.0.0 is the newest that carries the CRD schema as
a JSON object literal (`const schema = {...};` in `package/monitoring.coreos.com/v1/PrometheusRule.js`;
4.4.x on ship only ajv-compiled JavaScript). @kubernetes-models/crd-generate built it from
prometheus-operator v0.57.0's `example/prometheus-operator-crd-full/monitoring.coreos.com_prometheusrules.yaml`
(package.json's "crd-generate" inputs): descriptions dropped, `nullable: true` on optional fields,
`apiVersion`/`kind` pinned by `enum`, `metadata` a `$ref` to ObjectMeta. The literal is found as
scripts/gateway_api_schema.py finds it (its LITERAL pattern).

    python scripts/prometheus_rule_schema.py            # runs `npm pack` (npm registry), writes the asset
    python scripts/prometheus_rule_schema.py --tarball kubernetes-models-prometheus-operator-4.0.0.tgz
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tarfile
import tempfile
from pathlib import Path

from gateway_api_schema import LITERAL

REPO = Path(__file__).resolve().parent.parent
PACKAGE, VERSION = "@kubernetes-models/prometheus-operator", "4.0.0"
MEMBER = "package/monitoring.coreos.com/v1/PrometheusRule.js"
OUT = REPO / "tests" / "assets" / "prometheus-operator" / "prometheusrule-v1.schema.json"


def npm_pack(dest: Path) -> Path:
    subprocess.run(["npm", "pack", f"{PACKAGE}@{VERSION}", "--pack-destination", str(dest)], check=True,
                   capture_output=True)
    return next(dest.glob("*.tgz"))


def extract(tarball: Path) -> dict:
    with tarfile.open(tarball) as tar:
        meta = json.load(tar.extractfile("package/package.json"))  # type: ignore[arg-type]
        source = tar.extractfile(MEMBER).read().decode()  # type: ignore[union-attr]
    if meta["version"] != VERSION:
        raise SystemExit(f"{tarball} is {PACKAGE} {meta['version']}, not {VERSION}")
    match = LITERAL.search(source)
    if match is None:
        raise SystemExit(f"no `const schema = {{...}};` literal in {MEMBER}")
    schema = json.loads(match.group(1))
    assert schema["properties"]["apiVersion"]["enum"] == ["monitoring.coreos.com/v1"]
    crd = next(url for url in meta["crd-generate"]["input"] if url.endswith("_prometheusrules.yaml"))
    return {"$comment": (f"PrometheusRule monitoring.coreos.com/v1 openAPIV3Schema, as shipped in the npm package "
                         f"{PACKAGE}@{VERSION} ({MEMBER}), generated from {crd}. Written by "
                         "scripts/prometheus_rule_schema.py; do not edit."),
            **schema}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tarball", type=Path, help=f"a local `npm pack {PACKAGE}@{VERSION}` (default: run npm pack)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        schema = extract(args.tarball or npm_pack(Path(tmp)))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(schema, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {OUT.relative_to(REPO)}")


if __name__ == "__main__":
    main()
