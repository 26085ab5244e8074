"""Rendered Kubernetes manifests checked by `kubernetes-validate --strict`, the validator users run.

kubernetes-validate ships the Kubernetes JSON schemas inside its package, so this runs offline.
Each check is also shown to fail on a broken copy, so a validator that silently passes nothing
cannot make these tests green.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

K8S_VERSION = "1.37.0"


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


def kubernetes_validate(*files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "-k", K8S_VERSION, *map(str, files)],
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
