"""Shadow traffic over real HTTP: the official openai SDK as the client, prometheus_client's parser for the metrics."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import copy_checkpoint, free_port
from serve_support import LiveServer
from test_serve_rollout import _variant

KEY = "shadow-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
SHADOW_DELAY_S = 0.4  # per forward pass of the slowed shadow: a prefill and a decode step at least


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, sealed_checkpoint: Path) -> Path:
    return copy_checkpoint(sealed_checkpoint, tmp_path_factory.mktemp("shadow"))


def _server(ref: Path | str, **options: Any) -> tuple[LiveServer, Any]:
    from lmctl.serve import build_app
    from lmctl.serve.settings import ServeSettings

    app = build_app(str(ref), ServeSettings(**options), [KEY])
    return LiveServer(app, free_port()), app


def _slow_down(app: Any) -> None:
    """Make the shadow's model sleep before every forward pass (a torch forward pre-hook)."""
    (shadow,) = app.state.lmctl.router.extra_slots
    shadow.loaded.model.register_forward_pre_hook(lambda *_: time.sleep(SHADOW_DELAY_S))


def _shadow_report(url: str, settled: int, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        report = httpx.get(f"{url}/v1/shadow", headers=AUTH).json()
        done = report["requests"]["ok"] + report["requests"]["error"] + report["requests"]["skipped"]
        if done >= settled and report["in_flight"] == 0:
            return report
        assert time.monotonic() < deadline, report
        time.sleep(0.05)


def _samples(url: str, name: str) -> dict[tuple[str, ...], float]:
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)}
    return {tuple(sorted(s.labels.items())): s.value for s in families[name].samples if s.name.endswith("_total")
            or s.name.endswith("_count")}


def test_first_difference_is_the_first_unequal_token() -> None:
    from lmctl.serve.shadow import first_difference

    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2, 3], [1, 2]) == 2


def test_client_gets_the_primary_answer_without_waiting_for_a_slow_shadow(checkpoint: Path, tmp_path: Path) -> None:
    twin = _variant(checkpoint, tmp_path / "twin", 1.0)  # same weights, own copy: a separately loaded shadow
    plain, _ = _server(checkpoint)
    with plain:
        client = openai.OpenAI(base_url=f"{plain.url}/v1", api_key=KEY, max_retries=0)
        expected = client.completions.create(model="step-000006", prompt="The model", max_tokens=6, temperature=0)
    srv, app = _server(checkpoint, shadow=str(twin), shadow_max_in_flight=16)
    _slow_down(app)
    with srv:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=KEY, max_retries=0)
        took = []
        for _ in range(4):
            started = time.perf_counter()
            got = client.completions.create(model="step-000006", prompt="The model", max_tokens=6, temperature=0)
            took.append(time.perf_counter() - started)
            assert got.choices[0].text == expected.choices[0].text
            assert got.system_fingerprint == expected.system_fingerprint  # the primary's version answered
        sampled = client.chat.completions.create(model="step-000006", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=6, temperature=1.0, seed=3)
        assert sampled.choices[0].message.content is not None
        report = _shadow_report(srv.url, settled=5)
        assert report["requests"] == {"ok": 5, "error": 0, "skipped": 0}
        assert report["latency_ms"]["p50"] >= 2 * SHADOW_DELAY_S * 1000
        assert max(took) < 2 * SHADOW_DELAY_S, took  # no client waited for its shadow copy
        assert (report["compared"], report["matches"], report["agreement"], report["uncompared"]) == (4, 4, 1.0, 1)
        assert report["first_difference"] is None and report["version"] != report["primary_version"]
        health = httpx.get(f"{srv.url}/healthz").json()
        assert health["shadow"]["agreement"] == 1.0
        version = report["version"]
        comparisons = _samples(srv.url, "lmctl_shadow_comparisons")
        key = (("model", "step-000006"), ("result", "match"), ("version", version))
        assert comparisons[key] == 4.0
        assert comparisons[(("model", "step-000006"), ("result", "uncompared"), ("version", version))] == 1.0
        latency = _samples(srv.url, "lmctl_shadow_latency_seconds")
        assert latency[(("model", "step-000006"), ("version", version))] == 5.0


def test_a_failing_shadow_is_counted_and_never_reaches_the_client(checkpoint: Path, tmp_path: Path) -> None:
    broken = _variant(checkpoint, tmp_path / "broken", float("nan"))
    srv, _ = _server(checkpoint, shadow=str(broken))
    with srv:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=KEY, max_retries=0)
        for _ in range(3):
            got = client.completions.create(model="step-000006", prompt="The model", max_tokens=4, temperature=0)
            assert got.choices[0].finish_reason in ("stop", "length")
        report = _shadow_report(srv.url, settled=3)
        assert report["requests"]["error"] + report["requests"]["skipped"] == 3 and report["requests"]["error"] >= 1
        assert report["compared"] == 0 and report["agreement"] is None
        requests = _samples(srv.url, "lmctl_shadow_requests")
        errors = [v for k, v in requests.items() if ("outcome", "error") in k]
        assert errors == [report["requests"]["error"]]


def test_shadow_route_without_a_shadow_is_a_404(checkpoint: Path) -> None:
    srv, _ = _server(checkpoint)
    with srv:
        response = httpx.get(f"{srv.url}/v1/shadow", headers=AUTH)
        assert response.status_code == 404 and "--shadow" in response.json()["error"]["message"]
        assert "shadow" not in httpx.get(f"{srv.url}/healthz").json()
