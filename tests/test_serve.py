"""The HTTP API over real HTTP: OpenAI shapes, streaming, auth, limits, metrics, sampling log."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from pathlib import Path

import httpx
import pytest

from conftest import copy_checkpoint, free_port
from serve_support import LiveServer, diverged_model, log_records, sse_events

KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, sealed_checkpoint: Path) -> Path:
    return copy_checkpoint(sealed_checkpoint, tmp_path_factory.mktemp("served"))


def _server(ref: Path | str, **options: object) -> LiveServer:
    from lmctl.serve import build_app
    from lmctl.serve.settings import ServeSettings

    settings = ServeSettings(**options)  # type: ignore[arg-type]
    return LiveServer(build_app(str(ref), settings, [KEY]), free_port())


def test_completions_chat_streaming_and_request_ids(checkpoint: Path) -> None:
    with _server(checkpoint, served_model_name="tiny") as srv:
        assert httpx.get(f"{srv.url}/readyz").json()["status"] == "ready"
        health = httpx.get(f"{srv.url}/healthz")
        assert health.status_code == 200 and health.headers["x-request-id"].startswith("req-")
        # where it runs and which SDPA kernel its attention is planned for (lmctl.serve.kvcache.attention_plan)
        assert {k: health.json()["primary"][k] for k in ("device", "attention_kernel")} == {
            "device": "cpu", "attention_kernel": "flash"}
        models = httpx.get(f"{srv.url}/v1/models", headers=AUTH).json()
        assert models["data"][0]["id"] == "tiny" and models["data"][0]["versions"][0]["version"].startswith("sha-")

        body = {"model": "tiny", "prompt": "The model", "max_tokens": 8, "temperature": 0}
        plain = httpx.post(f"{srv.url}/v1/completions", json=body, headers={**AUTH, "X-Request-Id": "abc-123"}, timeout=60)
        assert plain.status_code == 200, plain.text
        assert plain.headers["x-request-id"] == "abc-123" and plain.json()["id"] == "cmpl-abc-123"
        answer = plain.json()
        assert answer["object"] == "text_completion" and answer["usage"]["completion_tokens"] >= 1
        assert answer["choices"][0]["finish_reason"] in ("stop", "length")

        streamed = httpx.post(f"{srv.url}/v1/completions", json={**body, "stream": True,
                              "stream_options": {"include_usage": True}}, headers=AUTH, timeout=60)
        assert streamed.headers["content-type"].startswith("text/event-stream")
        events = sse_events(streamed)
        assert events[-1] == "[DONE]" and events[-2]["usage"] == answer["usage"]
        assert "".join(e["choices"][0]["text"] for e in events[:-2]) == answer["choices"][0]["text"]  # greedy: same text

        chat = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6, "temperature": 0}
        reply = httpx.post(f"{srv.url}/v1/chat/completions", json=chat, headers=AUTH, timeout=60).json()
        assert reply["object"] == "chat.completion" and reply["choices"][0]["message"]["role"] == "assistant"
        chunks = sse_events(httpx.post(f"{srv.url}/v1/chat/completions", json={**chat, "stream": True}, headers=AUTH, timeout=60))
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant" and chunks[-1] == "[DONE]"
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
        assert text == reply["choices"][0]["message"]["content"]


def test_auth_limits_and_errors_use_openai_error_shape(checkpoint: Path) -> None:
    with _server(checkpoint, max_tokens_cap=16, max_input_tokens=40, max_body_bytes=4096) as srv:
        url = f"{srv.url}/v1/completions"
        denied = httpx.post(url, json={"prompt": "x"})
        assert denied.status_code == 401 and denied.json()["error"]["type"] == "authentication_error"
        assert httpx.post(url, json={"prompt": "x"}, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(f"{srv.url}/v1/models").status_code == 401
        too_many = httpx.post(url, json={"prompt": "x", "max_tokens": 17}, headers=AUTH)
        assert too_many.status_code == 400 and "cap of 16" in too_many.json()["error"]["message"]
        too_long = httpx.post(url, json={"prompt": "word " * 200}, headers=AUTH)
        assert too_long.status_code == 400 and "at most 40" in too_long.json()["error"]["message"]
        huge = httpx.post(url, content=json.dumps({"prompt": "x" * 5000}), headers={**AUTH, "Content-Type": "application/json"})
        assert huge.status_code == 413 and huge.headers["x-request-id"]

        def chunks():  # no Content-Length: the limit must hold on the bytes received
            yield b'{"prompt": "'
            for _ in range(10):
                yield b"y" * 1000
            yield b'"}'

        chunked = httpx.post(url, content=chunks(), headers={**AUTH, "Content-Type": "application/json"})
        assert chunked.status_code == 413
        unknown = httpx.post(url, json={"prompt": "x", "logit_bias": {}}, headers=AUTH)
        assert unknown.status_code == 422 and "logit_bias" in unknown.json()["error"]["message"]
        other = httpx.post(url, json={"prompt": "x", "model": "gpt-4"}, headers=AUTH)
        assert other.status_code == 404
        assert httpx.post(f"{srv.url}/v1/no-such-route", json={}, headers=AUTH).status_code == 404
        metrics = httpx.get(f"{srv.url}/metrics").text
        for endpoint, refused in (("completions", 2), ("models", 1)):
            assert re.search(rf'lmctl_request_errors_total\{{endpoint="{endpoint}",model="[^"]+",status="401",'
                             rf'version="sha-\w+"\}} {refused}.0', metrics), endpoint
        assert 'endpoint="chat.completions"' not in metrics and "no-such-route" not in metrics


def test_full_queue_gets_429_and_slow_requests_504(checkpoint: Path) -> None:
    async def burst(url: str, n: int, body: dict) -> list[int]:
        async with httpx.AsyncClient(timeout=120) as client:
            responses = await asyncio.gather(*[client.post(url, json=body, headers=AUTH) for _ in range(n)])
        return [r.status_code for r in responses]

    with _server(checkpoint, max_batch_size=1, max_queue=1, batch_wait_ms=0) as srv:
        codes = asyncio.run(burst(f"{srv.url}/v1/completions", 12, {"prompt": "The", "max_tokens": 40, "temperature": 0}))
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
        metrics = httpx.get(f"{srv.url}/metrics").text
        assert re.search(r'lmctl_request_errors_total\{endpoint="completions",model="[^"]+",status="429",'
                         r'version="sha-\w+"\} [1-9]', metrics)
    with _server(checkpoint, request_timeout_s=0.001) as srv:
        slow = httpx.post(f"{srv.url}/v1/completions", json={"prompt": "The", "max_tokens": 200, "temperature": 0},
                          headers=AUTH, timeout=60)
        assert slow.status_code == 504 and slow.json()["error"]["type"] == "timeout"


def test_a_failure_inside_generation_is_a_counted_500_in_openai_shape(tiny_base: Path, tmp_path: Path) -> None:
    """A model whose weights diverged (NaN) fails its requests inside generation. The client gets
    OpenAI's error object (a stream, whose 200 already went out, an error event), the metrics
    count both as 500s, and the server logs one line each: no ASGI crash with a traceback."""
    diverged = diverged_model(tiny_base, tmp_path / "diverged")
    body = {"prompt": "The", "max_tokens": 4}
    # no warm-up: it would keep this server not ready (tests/test_serve_warmup.py), and here the requests must fail
    with _server(diverged, served_model_name="tiny", warmup_tokens=0) as srv, \
            log_records("lmctl", "uvicorn.error") as records:
        plain = httpx.post(f"{srv.url}/v1/completions", json=body, headers=AUTH, timeout=60)
        streamed = httpx.post(f"{srv.url}/v1/completions", json={**body, "stream": True}, headers=AUTH, timeout=60)
        metrics = httpx.get(f"{srv.url}/metrics").text
    assert plain.status_code == 500 and plain.headers["x-request-id"]
    assert plain.json() == {"error": {"message": "internal error", "type": "server_error", "code": None}}
    events = sse_events(streamed)
    assert streamed.status_code == 200 and events[-2]["error"]["type"] == "server_error" and events[-1] == "[DONE]"
    assert re.search(r'lmctl_requests_total\{endpoint="completions",model="tiny",status="500",version="[^"]+"\} 2.0',
                     metrics)
    lines = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    assert len(lines) == 2 and all("failed: NonFiniteLogitsError" in line for line in lines), lines
    assert not any(r.exc_info for r in records)


def test_metrics_are_labeled_with_model_and_version(checkpoint: Path) -> None:
    with _server(checkpoint, served_model_name="tiny") as srv:
        for _ in range(3):
            assert httpx.post(f"{srv.url}/v1/completions", json={"prompt": "The", "max_tokens": 4},
                              headers=AUTH, timeout=60).status_code == 200
        text = httpx.get(f"{srv.url}/metrics").text
    version = re.search(r'version="(sha-\w+)"', text)[1]  # type: ignore[index]
    labels = f'model="tiny",version="{version}"'
    # the exposition format sorts label names
    for series in (f'lmctl_request_latency_seconds_count{{endpoint="completions",{labels}}} 3.0',
                   f'lmctl_requests_total{{endpoint="completions",model="tiny",status="200",version="{version}"}} 3.0',
                   f"lmctl_requests_in_flight{{{labels}}} 0.0", f"lmctl_queue_depth{{{labels}}} 0.0",
                   f"lmctl_time_to_first_token_seconds_count{{{labels}}} 3.0"):
        assert series in text, series
    tokens_out = float(re.search(rf"lmctl_tokens_out_total\{{{labels}\}} (\S+)", text)[1])  # type: ignore[index]
    assert 3 <= tokens_out <= 12


def test_sample_log_redacts_pii_and_never_holds_raw_prompts(checkpoint: Path, tmp_path: Path) -> None:
    log_path = tmp_path / "samples.jsonl"
    prompt = "Mail jane.doe@example.com or call +1 415 555 0100 about the model"
    with _server(checkpoint, sample_log=log_path, sample_rate=1.0) as srv:
        for body, path in (({"prompt": prompt, "max_tokens": 3}, "completions"),
                           ({"messages": [{"role": "user", "content": prompt}], "max_tokens": 3}, "chat/completions")):
            assert httpx.post(f"{srv.url}/v1/{path}", json=body, headers=AUTH, timeout=60).status_code == 200
    raw = log_path.read_text()
    assert "jane.doe@example.com" not in raw and "555 0100" not in raw
    rows = [json.loads(line) for line in raw.splitlines()]
    assert [r["endpoint"] for r in rows] == ["completions", "chat.completions"]
    assert "[REDACTED_EMAIL]" in rows[0]["prompt"] and rows[0]["pii_redacted"]["email"] == 1
    assert "[REDACTED_EMAIL]" in rows[1]["messages"][0]["content"] and rows[1]["request_id"].startswith("req-")


def test_non_loopback_without_keys_needs_insecure(cli, checkpoint: Path) -> None:
    refused = cli("serve", str(checkpoint), "--host", "0.0.0.0", "--port", str(free_port()))
    assert refused.code == 2 and "--insecure" in refused.err
    bad = cli("serve", str(checkpoint), "--sample-rate", "0.5")
    assert bad.code == 2 and "sample_log" in bad.err
