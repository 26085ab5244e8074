"""Re-extract the Gateway API HTTPRoute v1 schema that tests/test_deploy_validators.py checks against.

    tests/assets/gateway-api/httproute-v1.schema.json

No Python package ships the Gateway API CRDs, and the tests cannot reach the project's release
page. The npm package @kubernetes-models/gateway-api 0.5.1 carries the schema of every CRD in
gateway-api v1.0.0's `standard-install.yaml` and `experimental-install.yaml` (its package.json
lists them under "crd-generate"), as a JSON object literal in
`package/gateway.networking.k8s.io/v1/HTTPRoute.js`. @kubernetes-models/crd-generate built it
from the CRD's `openAPIV3Schema`: descriptions dropped, `nullable: true` on optional fields,
`apiVersion`/`kind` pinned by `enum`, `metadata` a `$ref` to ObjectMeta; the experimental
channel, read last, is the one kept (a superset of standard: it adds `rules[].timeouts` and
`parentRefs[].port`). Later versions of the package (2.x) ship only ajv-compiled JavaScript.

    python scripts/gateway_api_schema.py            # runs `npm pack` (npm registry), writes the asset
    python scripts/gateway_api_schema.py --tarball kubernetes-models-gateway-api-0.5.1.tgz
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE, VERSION, GATEWAY_API = "@kubernetes-models/gateway-api", "0.5.1", "v1.0.0"
MEMBER = "package/gateway.networking.k8s.io/v1/HTTPRoute.js"
OUT = REPO / "tests" / "assets" / "gateway-api" / "httproute-v1.schema.json"
# crd-generate writes the schema with JSON.stringify(schema, null, 4), so the literal is JSON
LITERAL = re.compile(r"^const schema = (\{.*?^\});$", re.S | re.M)


def literal_schema(tarball: Path, package: str, version: str, member: str) -> tuple[dict, dict]:
    """(package.json, the schema literal of `member`) from a `npm pack` tarball of package@version."""
    with tarfile.open(tarball) as tar:
        meta = json.load(tar.extractfile("package/package.json"))  # type: ignore[arg-type]
        source = tar.extractfile(member).read().decode()  # type: ignore[union-attr]
    if meta["version"] != version:
        raise SystemExit(f"{tarball} is {package} {meta['version']}, not {version}")
    match = LITERAL.search(source)
    if match is None:
        raise SystemExit(f"no `const schema = {{...}};` literal in {member}")
    return meta, json.loads(match.group(1))


def extract(tarball: Path) -> dict:
    meta, schema = literal_schema(tarball, PACKAGE, VERSION, MEMBER)
    assert schema["properties"]["apiVersion"]["enum"] == ["gateway.networking.k8s.io/v1"]
    inputs = meta["crd-generate"]["input"]
    return {"$comment": (f"HTTPRoute gateway.networking.k8s.io/v1 openAPIV3Schema of Gateway API {GATEWAY_API}, as "
                         f"shipped in the npm package {PACKAGE}@{VERSION} ({MEMBER}), generated from "
                         f"{', '.join(i.rsplit('/', 1)[-1] for i in inputs if GATEWAY_API in i)} of that "
                         "release. Written by scripts/gateway_api_schema.py; do not edit."),
            **schema}


def write_asset(description: str, extract_from: Callable[[Path], dict], out: Path, package: str, version: str) -> None:
    """The command line of a schema script: `npm pack` (or --tarball), extract, write `out`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--tarball", type=Path, help=f"a local `npm pack {package}@{version}` (default: run npm pack)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.tarball is None:
            subprocess.run(["npm", "pack", f"{package}@{version}", "--pack-destination", tmp], check=True,
                           capture_output=True)
        schema = extract_from(args.tarball or next(Path(tmp).glob("*.tgz")))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(schema, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out.relative_to(REPO)}")


def main() -> None:
    write_asset(__doc__.splitlines()[0], extract, OUT, PACKAGE, VERSION)


if __name__ == "__main__":
    main()
