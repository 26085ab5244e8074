"""Canary routing with automatic rollback, and hot reload of a moving alias, over real HTTP."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

from conftest import copy_checkpoint, free_port
from serve_support import LiveServer

KEY = "rollout-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, sealed_checkpoint: Path) -> Path:
    return copy_checkpoint(sealed_checkpoint, tmp_path_factory.mktemp("rollout"))


def _variant(ckpt: Path, out: Path, scale: float) -> Path:
    """A re-sealed copy whose adapter weights are scaled (NaN makes a deliberately broken model)."""
    from safetensors.torch import load_file, save_file

    from lmctl.checkpoint import read_manifest, seal

    shutil.copytree(ckpt, out)
    tensors = load_file(out / "adapter_model.safetensors")
    save_file({k: v * scale for k, v in tensors.items()}, out / "adapter_model.safetensors")
    seal(out, read_manifest(out).model_dump(exclude={"files"}))
    return out


def _server(ref: Path | str, **options: object) -> LiveServer:
    from lmctl.serve import build_app
    from lmctl.serve.settings import ServeSettings

    return LiveServer(build_app(str(ref), ServeSettings(**options), [KEY]), free_port())  # type: ignore[arg-type]


def _complete(url: str, client_id: str | None = None, max_tokens: int = 4, temperature: float = 1.0) -> httpx.Response:
    headers = {**AUTH, **({"X-Client-Id": client_id} if client_id else {})}
    return httpx.post(f"{url}/v1/completions", json={"prompt": "The model", "max_tokens": max_tokens,
                      "temperature": temperature}, headers=headers, timeout=60)


def test_broken_canary_is_rolled_back_automatically(checkpoint: Path, tmp_path: Path) -> None:
    broken = _variant(checkpoint, tmp_path / "broken", float("nan"))
    policy = {"window_s": 120, "min_requests": 4, "max_error_rate_margin": 0.05, "max_p95_margin_pct": 1000}
    with _server(checkpoint, canary=str(broken), canary_weight=0.5, canary_policy=policy) as srv:
        warmed = httpx.get(f"{srv.url}/healthz").json()
        primary = warmed["primary"]["version"]
        # ready although the canary failed its warm-up: the canary policy, not readiness, handles a bad canary
        assert "NonFiniteLogitsError" in warmed["warmup"]["versions"][warmed["canary"]["version"]]["error"]
        codes = [_complete(srv.url).status_code for _ in range(40)]
        health = httpx.get(f"{srv.url}/healthz").json()
        assert health["canary"]["state"] == "rolled_back", codes
        event = health["events"][-1]
        assert event["event"] == "canary_rollback" and "error rate" in event["reason"]
        assert event["canary"]["requests"] >= 4 and event["canary"]["error_rate"] > 0.05
        assert 500 in codes and set(codes) <= {200, 500}
        after = [_complete(srv.url) for _ in range(10)]  # no more traffic to the canary
        assert all(r.status_code == 200 and r.headers["x-model-version"] == primary for r in after)
        metrics = httpx.get(f"{srv.url}/metrics").text
        assert f'lmctl_canary_rollbacks_total{{model="step-000006",version="{event["canary_version"]}"}} 1.0' in metrics


def test_canary_split_is_sticky_per_client_and_tracks_both_versions(checkpoint: Path, tmp_path: Path) -> None:
    canary = _variant(checkpoint, tmp_path / "canary", 1.0001)
    lenient = {"max_p95_margin_pct": 1e6}  # a shared CI machine's latency noise must not roll this one back
    with _server(checkpoint, canary=str(canary), canary_weight=0.3, canary_policy=lenient) as srv:
        seen: dict[str, set[str]] = {}
        for client in range(16):
            for _ in range(3):
                response = _complete(srv.url, client_id=f"client-{client}", max_tokens=2)
                assert response.status_code == 200
                seen.setdefault(f"client-{client}", set()).add(response.headers["x-model-version"])
        assert all(len(versions) == 1 for versions in seen.values())  # sticky
        assert len(set().union(*seen.values())) == 2  # both versions got traffic
        state = httpx.get(f"{srv.url}/healthz").json()
        assert state["canary"]["state"] == "active" and state["canary"]["window"]["requests"] > 0


def _artifact_dir(version: str) -> Path:
    from lmctl import tracking, versions

    run_uri = tracking.client().get_run(versions.get_version("tiny", version).run_id).info.artifact_uri
    path = Path(urlparse(run_uri).path) / "checkpoint"
    assert path.is_dir(), run_uri
    return path


def test_alias_moves_are_followed_without_dropping_requests(cli, checkpoint: Path, tmp_path: Path) -> None:
    from lmctl import registry

    for _ in range(3):
        assert cli("register", str(checkpoint), "--name", "tiny").code == 0
    registry.move_alias("tiny", "production", "1", reason="test")
    with _server("models:/tiny@production", reload_interval_s=0.2) as srv:
        results: list[tuple[int, str]] = []
        stop = threading.Event()

        def traffic() -> None:
            while not stop.is_set():
                response = _complete(srv.url, max_tokens=20, temperature=0)
                results.append((response.status_code, response.headers.get("x-model-version", "")))

        worker = threading.Thread(target=traffic)
        worker.start()
        time.sleep(1.0)
        registry.move_alias("tiny", "production", "2", reason="test")
        deadline = time.monotonic() + 60
        while httpx.get(f"{srv.url}/readyz").json()["version"] != "2":
            assert time.monotonic() < deadline, "alias move was not followed"
            time.sleep(0.1)
        while not any(version == "2" for _, version in results):  # traffic goes on, now to version 2
            assert time.monotonic() < deadline, "no request reached the new version"
            time.sleep(0.1)
        stop.set()
        worker.join()
        assert {code for code, _ in results} == {200} and {v for _, v in results} == {"1", "2"}

        tampered = _artifact_dir("3") / "adapter_model.safetensors"
        tampered.write_bytes(tampered.read_bytes()[:-8] + b"tampered")
        registry.move_alias("tiny", "production", "3", reason="test")
        deadline = time.monotonic() + 60
        while not any(e["event"] == "reload_refused" for e in httpx.get(f"{srv.url}/healthz").json()["reloads"]):
            assert time.monotonic() < deadline, "tampered version was neither loaded nor refused"
            time.sleep(0.1)
        assert httpx.get(f"{srv.url}/readyz").json()["version"] == "2"
        assert _complete(srv.url).status_code == 200
        reloads = httpx.get(f"{srv.url}/healthz").json()["reloads"]
        assert reloads[-1]["event"] == "reload_refused" and "sha256 mismatch" in reloads[-1]["detail"]
        from prometheus_client.parser import text_string_to_metric_families

        (family,) = [f for f in text_string_to_metric_families(httpx.get(f"{srv.url}/metrics").text)
                     if f.name == "lmctl_model_reloads"]
        reload_counts = {(s.labels["version"], s.labels["outcome"]): s.value for s in family.samples
                         if s.name == "lmctl_model_reloads_total" and s.labels["model"] == "tiny"}
        assert reload_counts == {("2", "swapped"): 1.0, ("3", "refused"): 1.0}

        # a version that verifies and loads but cannot generate (NaN weights) fails its warm-up: refused too
        assert cli("register", str(_variant(checkpoint, tmp_path / "nan", float("nan"))), "--name", "tiny").code == 0
        registry.move_alias("tiny", "production", "4", reason="test")
        deadline = time.monotonic() + 60
        while httpx.get(f"{srv.url}/healthz").json()["reloads"][-1]["version"] != "4":
            assert time.monotonic() < deadline, "the NaN version was neither loaded nor refused"
            time.sleep(0.1)
        refused = httpx.get(f"{srv.url}/healthz").json()["reloads"][-1]
        assert refused["event"] == "reload_refused" and "warm-up failed: NonFiniteLogitsError" in refused["detail"]
        assert httpx.get(f"{srv.url}/readyz").json()["version"] == "2" and _complete(srv.url).status_code == 200
