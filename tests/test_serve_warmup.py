"""Readiness waits for a warm-up generation through the real engine: a cold server gets no traffic."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from conftest import copy_checkpoint, free_port
from serve_support import LiveServer, diverged_model, log_records


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, sealed_checkpoint: Path) -> Path:
    return copy_checkpoint(sealed_checkpoint, tmp_path_factory.mktemp("warm"))


def _app(ref: Path, **options: object):  # type: ignore[no-untyped-def]
    from lmctl.serve import build_app
    from lmctl.serve.settings import ServeSettings

    return build_app(str(ref), ServeSettings(**options), [])  # type: ignore[arg-type]


def _until_ready(url: str, timeout: float = 60) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while (ready := httpx.get(f"{url}/readyz")).status_code != 200:
        assert time.monotonic() < deadline, ready.text
        time.sleep(0.02)
    return ready


def test_not_ready_until_the_warm_up_generation_ran(checkpoint: Path) -> None:
    app = _app(checkpoint, warmup_tokens=3)
    router = next(m for m in app.user_middleware if m.kwargs.get("ctx")).kwargs["ctx"].router
    engine = router.primary.engine
    with log_records("lmctl.serve") as records:
        with engine._cv:  # the engine cannot admit the warm-up job while this is held
            server = LiveServer(app, free_port(), wait_ready=False).__enter__()
            try:
                for _ in range(5):  # the server answers health checks meanwhile, and says why it is not ready
                    cold = httpx.get(f"{server.url}/readyz")
                    assert cold.status_code == 503 and cold.json()["why"] == "warming up"
                    time.sleep(0.05)
                assert httpx.get(f"{server.url}/healthz").json()["warmup"]["status"] == "running"
                assert engine.forward_passes == 0
            except BaseException:
                server.__exit__(None, None, None)
                raise
        try:
            ready = _until_ready(server.url)
            assert ready.json()["status"] == "ready"
            assert engine.forward_passes >= 1  # the model ran before the first 200
            warmup = httpx.get(f"{server.url}/healthz").json()["warmup"]
            version = router.primary.version
            assert warmup["status"] == "done" and warmup["tokens"] == 3 and warmup["seconds"] > 0
            assert warmup["versions"][version]["tokens"] == 3  # no stop token: the whole length ran
        finally:
            server.__exit__(None, None, None)
    assert any(r.getMessage().startswith("warm-up: 3 greedy token(s)") for r in records)


def test_warm_up_off_and_failed(checkpoint: Path, tiny_base: Path, tmp_path: Path) -> None:
    with LiveServer(_app(checkpoint, warmup_tokens=0), free_port(), wait_ready=False) as server:
        assert httpx.get(f"{server.url}/readyz").status_code == 200
        assert httpx.get(f"{server.url}/healthz").json()["warmup"] == {"status": "off"}
    # a model whose weights diverged (NaN) cannot generate: it must never be sent traffic
    diverged = diverged_model(tiny_base, tmp_path / "diverged")
    with LiveServer(_app(diverged), free_port(), wait_ready=False) as server:
        deadline = time.monotonic() + 60
        while (warmup := httpx.get(f"{server.url}/healthz").json()["warmup"])["status"] != "failed":
            assert time.monotonic() < deadline and warmup["status"] in ("pending", "running"), warmup
            time.sleep(0.02)
        assert "NonFiniteLogitsError" in warmup["error"]
        not_ready = httpx.get(f"{server.url}/readyz")
        assert not_ready.status_code == 503 and not_ready.json()["why"] == "warm-up failed"
