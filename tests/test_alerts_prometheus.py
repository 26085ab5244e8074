"""A real Prometheus scrapes a real `lmctl serve`, evaluates the rules `lmctl deploy` writes, and
fires the availability alert once the server answers with errors; the alert is read back from
Prometheus' HTTP API (/api/v1/alerts), labelled with the model and version that failed.

The rules are rendered with a one-hour period and a 20 s / 5 s burn window so the test runs in
seconds (the expressions are the production ones; only the windows shrink). The server's errors
are real 504s: a request timeout of 1 ms that no generation meets. Skipped only where the
`prometheus` binary is absent (Debian's `prometheus` package; .ci/run installs it).
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import copy_checkpoint, free_port
from serve_support import LiveServer

from lmctl.deploy.alerts import rules_file
from lmctl.deploy.kubernetes import dump
from lmctl.deploy.slo import BurnWindow, SloConfig

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (apt-get install prometheus)")
ALERT = "LmctlErrorBudgetBurn20s"


def _config(tmp: Path, target: str) -> Path:
    slo = SloConfig(period="1h", burn_windows=[BurnWindow(long_window="20s", short_window="5s",
                                                          budget_consumed=0.05, severity="page")])
    (tmp / "alerts.rules.yaml").write_text(dump(rules_file(slo, "tiny", "tiny")))
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "rule_files": ["alerts.rules.yaml"],
              "scrape_configs": [{"job_name": "lmctl", "static_configs": [{"targets": [target]}]}]}
    path = tmp / "prometheus.yml"
    path.write_text(dump(config))
    return path


def _until(what: str, check: Any, proc: subprocess.Popen[str], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"prometheus exited: {proc.stdout.read() if proc.stdout else ''}"
        try:
            found = check()
        except (httpx.TransportError, ValueError):  # not listening yet, or 503 "Service Unavailable" while it starts
            found = None
        if found:
            return found
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


def _errors(url: str, stop: threading.Event) -> None:
    while not stop.is_set():
        httpx.post(f"{url}/v1/completions", json={"prompt": "hello there", "max_tokens": 32}, timeout=10)
        time.sleep(0.05)


def test_prometheus_fires_the_burn_rate_alert_on_a_failing_server(tmp_path: Path, sealed_checkpoint: Path) -> None:
    from lmctl.serve import build_app
    from lmctl.serve.settings import ServeSettings

    ckpt = copy_checkpoint(sealed_checkpoint, tmp_path / "served")
    app = build_app(str(ckpt), ServeSettings(served_model_name="tiny", request_timeout_s=0.001), [])
    with LiveServer(app, free_port()) as server:
        assert httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 32}).status_code == 504
        version = httpx.get(f"{server.url}/readyz").json()["version"]
        api = f"http://127.0.0.1:{free_port()}"
        proc = subprocess.Popen([PROMETHEUS, f"--config.file={_config(tmp_path, server.url.removeprefix('http://'))}",
                                 f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address={api[7:]}"],
                                cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        stop = threading.Event()
        driver = threading.Thread(target=_errors, args=(server.url, stop), daemon=True)
        try:
            def scraped() -> bool:
                up = httpx.get(f"{api}/api/v1/query", params={"query": 'up{job="lmctl"}'}).json()["data"]["result"]
                return bool(up) and up[0]["value"][1] == "1"

            _until("the first scrape", scraped, proc)
            loaded = httpx.get(f"{api}/api/v1/rules").json()["data"]["groups"]
            assert ALERT in [r["name"] for g in loaded for r in g["rules"]]
            driver.start()

            def firing() -> list[dict[str, Any]]:
                alerts = httpx.get(f"{api}/api/v1/alerts").json()["data"]["alerts"]
                return [a for a in alerts if a["labels"]["alertname"] == ALERT and a["state"] == "firing"]

            (alert,) = _until(f"{ALERT} to fire", firing, proc)
        finally:
            stop.set()
            proc.terminate()
            proc.wait(timeout=30)
            if driver.is_alive():
                driver.join(timeout=15)
    assert alert["labels"] == {"alertname": ALERT, "model": "tiny", "version": version, "severity": "page"}
    assert alert["annotations"]["summary"] == f"tiny version {version} burns its error budget 9x too fast"
    assert alert["annotations"]["description"].startswith("100% of requests failed over the last 20s")
