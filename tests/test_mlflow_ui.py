"""What lmctl writes to the registry, as a person sees it: the MLflow UI in headless Chromium.

A real `mlflow server` over the test's sqlite store serves the UI (a JavaScript app that reads
the registry through MLflow's REST API); Chromium renders the registered model's page and a
version's page, saves screenshots and dumps the DOM the app built. Set LMCTL_UI_SCREENSHOTS=DIR
to keep the screenshots.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import free_port
from http_wait import wait_for_http

DESCRIPTION = "Completes sentences in the style of the tiny test corpus."


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if found is None:
        assert not os.environ.get("CI"), "CI installs chromium (make test's browser target); it must be there"
        pytest.skip("no chromium on this machine (make test installs it where apt-get and root are available)")
    return found


@pytest.fixture
def mlflow_ui(lmctl_home: Path, tmp_path: Path) -> Iterator[str]:
    """`mlflow server` on a loopback port over lmctl's embedded store (what `mlflow ui` runs)."""
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{lmctl_home / 'mlflow.db'}",
           "--default-artifact-root", (lmctl_home / "mlartifacts").as_uri(), "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]
    log = tmp_path / "mlflow.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/health", timeout=240, proc=proc, log=log)
        yield url
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)


def render(browser: str, url: str, shot: Path) -> str:
    """Screenshot of `url` once the app has loaded, and the DOM it built."""
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1400",
              "--virtual-time-budget=30000", f"--user-data-dir={shot.parent / ('profile-' + shot.stem)}"]
    subprocess.run([*common, f"--screenshot={shot}", url], capture_output=True, timeout=180, check=True)
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=180, check=True)
    keep = os.environ.get("LMCTL_UI_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / shot.name)
    return dom.stdout


def test_registered_model_and_version_pages_read_well(cli, sealed_checkpoint: Path, mlflow_ui: str, tmp_path: Path) -> None:
    browser = chromium()
    registered = cli("register", sealed_checkpoint, "--name", "tiny", "--alias", "production", "--description", DESCRIPTION,
                     "--json")
    assert registered.code == 0, registered.err

    model_dom = render(browser, f"{mlflow_ui}/#/models/tiny", tmp_path / "model-page.png")
    assert "LoRA adapters for the causal language model" in model_dom  # says what the model is
    assert "lmctl serve models:/tiny@production" in model_dom
    assert "Managed by lmctl" not in model_dom
    assert "Completes sent" in model_dom  # the versions table shows the start of each version's summary line
    assert "lmctl.alias_history" not in model_dom  # no JSON blob among the model's tags (the audit trail holds it)

    version_dom = render(browser, f"{mlflow_ui}/#/models/tiny/versions/1", tmp_path / "version-page.png")
    # the model card is the version's description, rendered from Markdown: headings and tables, not raw text
    assert DESCRIPTION in version_dom
    for heading in ("Intended use", "Training data", "Limitations", "Lineage"):
        assert f">{heading}</h2>" in version_dom, heading
    assert "<table" in version_dom and "## Intended use" not in version_dom
    assert ">tiny version 1</h1>" not in version_dom  # the page has its own title
    # digests are shortened in the description (a 64-character word widened the data table past the page)
    assert re.search(r"<code>[0-9a-f]{12}…</code>", version_dom)
    from lmctl import tracking

    described = tracking.client().get_model_version("tiny", "1").description
    assert not re.search(r"[0-9a-f]{64}", described), described
    assert f"`runs:/{registered.json['run_id']}/checkpoint`" in described and "file://" not in described
    for shot in ("model-page.png", "version-page.png"):
        assert (tmp_path / shot).stat().st_size > 20_000  # a painted page, not a blank one
