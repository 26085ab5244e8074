"""The official `openai` SDK and `prometheus_client`'s parser against one real `lmctl serve` process.

Users reach lmctl with these clients, not with our helpers: if the SDK cannot parse a chunk,
maps a status to the wrong error class, or Prometheus cannot read a metric line, it shows here.
One server (the tiny base model, so nothing is trained) serves the whole module.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import free_port
from http_wait import wait_for_http

KEY = "sdk-test-key-0123456789"
MODEL = "tiny"
MAX_QUEUE = 16
MAX_BATCH = 4


@dataclass
class Server:
    url: str
    log: Path  # the server's stdout and stderr

    def assert_clean_log(self) -> None:
        """Nothing so far crashed inside the server, even where the client got a proper answer."""
        text = self.log.read_text()
        for sign in ("Traceback", "Exception in ASGI application", "decode step failed", "failed:"):
            assert sign not in text, text[-3000:]

    def client(self, key: str = KEY, **kwargs: object) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=600, **kwargs)  # type: ignore[arg-type]

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, timeout=600)


@pytest.fixture(scope="module")
def server(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`python -m lmctl serve` on the tiny base model, exactly as a user starts it."""
    home = tmp_path_factory.mktemp("sdk-home")
    port = free_port()
    env = {**os.environ, "LMCTL_HOME": str(home), "LMCTL_API_KEYS": KEY}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "lmctl", "serve", str(tiny_base), "--port", str(port), "--served-model-name", MODEL,
           "--max-batch-size", str(MAX_BATCH), "--max-queue", str(MAX_QUEUE), "--max-tokens-cap", "200",
           "--max-body-bytes", "4096", "--request-timeout", "600"]  # a loaded CI machine is slow, not broken
    log = home / "serve.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/readyz", timeout=180, proc=proc, log=log)
    yield Server(url, log)
    proc.terminate()
    try:
        code = proc.wait(timeout=180)  # draining finishes in-flight requests first
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert code in (0, -signal.SIGTERM), log.read_text()  # uvicorn re-raises SIGTERM after draining


def test_models_list(server: Server) -> None:
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL] and models.data[0].object == "model"


def test_completions_plain_and_streamed_agree(server: Server) -> None:
    client = server.client()
    plain = client.completions.create(model=MODEL, prompt="The model", max_tokens=8, temperature=0)
    assert plain.object == "text_completion" and plain.model == MODEL and plain.id.startswith("cmpl-")
    assert plain.usage is not None and plain.usage.completion_tokens >= 1
    chunks = list(client.completions.create(model=MODEL, prompt="The model", max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("cmpl-")
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text  # greedy: same text
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage


def test_chat_plain_streamed_and_stream_helper_with_usage(server: Server) -> None:
    client = server.client()
    messages = [{"role": "user", "content": "Hello there"}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)  # type: ignore[arg-type]
    assert plain.object == "chat.completion" and plain.choices[0].message.role == "assistant"
    text = plain.choices[0].message.content

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,  # type: ignore[arg-type]
                                                 stream=True, stream_options={"include_usage": True}))
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    assert len({c.created for c in chunks}) == 1 and {c.model for c in chunks} == {MODEL}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage == plain.usage

    # The SDK's helper keeps the usage chunk only when it is a proper chunk of the same completion.
    with client.chat.completions.stream(model=MODEL, messages=messages, max_tokens=6, temperature=0,  # type: ignore[arg-type]
                                        stream_options={"include_usage": True}) as stream:
        events = list(stream)
        final = stream.current_completion_snapshot  # get_final_completion() raises on finish_reason "length"
    assert "".join(e.delta for e in events if e.type == "content.delta") == text
    assert final.choices[0].message.content == text and final.usage is not None and final.usage == plain.usage


def test_max_completion_tokens_is_honoured_and_preferred(server: Server) -> None:
    client = server.client()
    messages = [{"role": "user", "content": "Count"}]
    long = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, temperature=0)  # type: ignore[arg-type]
    assert long.usage is not None and long.usage.completion_tokens > 2  # so a limit of 2 is observable
    short = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=2, temperature=0)  # type: ignore[arg-type]
    assert short.usage is not None and short.usage.completion_tokens == 2 and short.choices[0].finish_reason == "length"
    # both sent: max_completion_tokens wins
    both = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=2, max_tokens=40,  # type: ignore[arg-type]
                                          temperature=0)
    assert both.usage == short.usage and both.choices[0].message.content == short.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="cap of 200"):
        client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=201)  # type: ignore[arg-type]


def test_error_classes(server: Server) -> None:
    client = server.client()
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong-key").models.list()
    with pytest.raises(openai.BadRequestError, match="cap of 200"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=500)
    with pytest.raises(openai.APIStatusError) as too_big:
        client.completions.create(model=MODEL, prompt="x" * 5000)
    assert too_big.value.status_code == 413
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.completions.create(model="gpt-4o", prompt="x")
    with pytest.raises(openai.UnprocessableEntityError, match="logit_bias"):  # accepted by OpenAI, refused here
        client.completions.create(model=MODEL, prompt="x", logit_bias={"1": 5})


def test_queue_overflow_is_rate_limit_error(server: Server) -> None:
    async def burst() -> list[object]:
        client = server.async_client()
        calls = [client.completions.create(model=MODEL, prompt="Once upon", max_tokens=60, temperature=0)
                 for _ in range(MAX_QUEUE + MAX_BATCH + 8)]
        return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(burst())
    limited = [r for r in results if isinstance(r, openai.RateLimitError)]
    served = [r for r in results if not isinstance(r, BaseException)]
    assert len(limited) + len(served) == len(results), [r for r in results if isinstance(r, BaseException)][:1]
    assert limited and len(served) >= MAX_QUEUE
    assert limited[0].response.headers["retry-after"] == "1"


def test_seed_reproduces_a_sampled_completion(server: Server) -> None:
    client = server.client()

    def sample(seed: int) -> str:
        reply = client.completions.create(model=MODEL, prompt="The", max_tokens=24, temperature=1.0, seed=seed)
        return reply.choices[0].text

    assert sample(7) == sample(7)
    assert len({sample(seed) for seed in (1, 2, 3, 4)}) > 1  # sampling is real: seeds change the text


def test_sixteen_concurrent_requests(server: Server) -> None:
    client = server.client()
    prompt = "Tokens are"
    alone = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0).choices[0].text

    async def many() -> list[object]:
        aclient = server.async_client()
        return await asyncio.gather(*[aclient.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
                                      for _ in range(16)])

    replies = asyncio.run(many())
    assert len({r.id for r in replies}) == 16  # type: ignore[attr-defined]
    assert {r.choices[0].text for r in replies} == {alone}  # type: ignore[attr-defined]  # batching changes nothing


def _scrape(server: Server) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Every sample of /metrics as {sample name: {sorted labels: value}}, read by Prometheus' own parser."""
    text = httpx.get(f"{server.url}/metrics").text
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def _value(samples: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str, **labels: str) -> float:
    return samples.get(name, {}).get(tuple(sorted({"model": MODEL, "version": "base", **labels}.items())), 0.0)


def test_metrics_parse_and_count_what_was_sent(server: Server) -> None:
    client = server.client()
    before = _scrape(server)
    usages = [client.completions.create(model=MODEL, prompt=f"Text {i}", max_tokens=5, temperature=0).usage
              for i in range(3)]
    usages.append(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],  # type: ignore[arg-type]
                                                 max_tokens=5, temperature=0).usage)
    with pytest.raises(openai.AuthenticationError):
        server.client(key="nope").completions.create(model=MODEL, prompt="x")
    after = _scrape(server)

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    assert delta("lmctl_requests_total", endpoint="completions", status="200") == 3
    assert delta("lmctl_requests_total", endpoint="chat.completions", status="200") == 1
    assert delta("lmctl_requests_total", endpoint="metrics", status="200") == 1  # the scrape before
    assert delta("lmctl_requests_total", endpoint="completions", status="401") == 1
    assert delta("lmctl_request_errors_total", endpoint="completions", status="401") == 1
    assert delta("lmctl_request_latency_seconds_count", endpoint="completions") == 4  # 3 served + 1 refused
    assert delta("lmctl_request_latency_seconds_count", endpoint="chat.completions") == 1
    assert delta("lmctl_tokens_in_total") == sum(u.prompt_tokens for u in usages if u)
    assert delta("lmctl_tokens_out_total") == sum(u.completion_tokens for u in usages if u)
    assert delta("lmctl_time_to_first_token_seconds_count") == 4
    assert _value(after, "lmctl_requests_in_flight") == 0 and _value(after, "lmctl_queue_depth") == 0
    # One request at a time: greedy rows feed drafts; what the model accepted is part of what it sent.
    accepted = delta("lmctl_draft_tokens_total", outcome="accepted")
    rejected = delta("lmctl_draft_tokens_total", outcome="rejected")
    assert {"accepted", "rejected"} <= {dict(k)["outcome"] for k in after["lmctl_draft_tokens_total"]}
    assert 0 <= accepted <= delta("lmctl_tokens_out_total") and rejected >= 0

    # Histograms are cumulative: counts never fall as `le` grows, and +Inf equals _count.
    for family in ("lmctl_request_latency_seconds", "lmctl_time_to_first_token_seconds"):
        series: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
        for labels, value in after[f"{family}_bucket"].items():
            le = dict(labels)["le"]
            rest = tuple(kv for kv in labels if kv[0] != "le")
            series.setdefault(rest, []).append((float(le), value))
        assert series, family
        for rest, buckets in series.items():
            counts = [v for _, v in sorted(buckets)]
            assert counts == sorted(counts), (family, rest)
            assert sorted(buckets)[-1][0] == float("inf") and counts[-1] == after[f"{family}_count"][rest]


def test_a_stop_string_ends_the_only_request_cleanly(server: Server) -> None:
    client = server.client()
    full = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=24, temperature=0).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert stop.strip(), full  # the greedy text must have a middle to stop at
    for _ in range(3):  # alone on the server, so its row is the batch's last when the stop string cancels it
        cut = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=24, temperature=0, stop=stop)
        assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"
        streamed = list(client.completions.create(model=MODEL, prompt="Once upon", max_tokens=24, temperature=0,
                                                  stop=stop, stream=True))
        assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text
    server.assert_clean_log()


def _assert_openai_error(response: httpx.Response, status: int, kind: str) -> dict[str, object]:
    """The body is OpenAI's error object, as the SDK reads it."""
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"] and {"message", "type", "code"} <= set(body["error"]), body
    assert body["error"]["type"] == kind and body["error"]["message"], body
    assert response.headers["x-request-id"]
    return body["error"]  # type: ignore[no-any-return]


def test_lone_surrogates_are_the_same_422_on_both_endpoints(server: Server) -> None:
    # valid JSON ("\udfff" is a legal escape) but no Unicode text; no JSON encoder the SDK uses can
    # even produce it, so the bytes go raw
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    chat = b'{"messages": [{"role": "user", "content": "hi \\udfff"}], "max_tokens": 2}'
    completion = b'{"prompt": "\\udfff", "max_tokens": 2}'
    errors = [_assert_openai_error(httpx.post(f"{server.url}/v1/{path}", content=body, headers=headers, timeout=60),
                                   422, "invalid_request_error")
              for path, body in (("chat/completions", chat), ("completions", completion))]
    assert "messages.0.content" in str(errors[0]["message"]) and "prompt" in str(errors[1]["message"])
    assert all("lone surrogate" in str(e["message"]) for e in errors)
    server.assert_clean_log()


def test_routing_and_body_errors_use_the_openai_error_shape(server: Server) -> None:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    not_utf8 = httpx.post(f"{server.url}/v1/completions", content=b'{"prompt": "\xff\xfe"}', headers=headers)
    _assert_openai_error(not_utf8, 400, "invalid_request_error")
    _assert_openai_error(httpx.post(f"{server.url}/v1/no-such-route", json={}, headers=headers), 404, "not_found_error")
    wrong_method = httpx.get(f"{server.url}/v1/completions", headers=headers)
    _assert_openai_error(wrong_method, 405, "invalid_request_error")
    assert wrong_method.headers["allow"] == "POST"
    with pytest.raises(openai.NotFoundError) as unknown:  # the SDK reads the message out of the error object
        server.client().get("/no-such-route", cast_to=httpx.Response)
    assert unknown.value.message.startswith("Error code: 404") and unknown.value.body == {
        "message": "Not Found", "type": "not_found_error", "code": None}


def test_every_response_is_counted_by_endpoint_and_status(server: Server) -> None:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    before = _scrape(server)
    sent = [httpx.post(f"{server.url}/v1/completions", content=b'{"prompt": "\xff"}', headers=headers),
            httpx.post(f"{server.url}/v1/chat/completions", headers=headers,
                       content=b'{"messages": [{"role": "user", "content": "\\udfff"}]}'),
            httpx.post(f"{server.url}/v1/completions", json={"prompt": "x" * 5000}, headers=headers),
            httpx.get(f"{server.url}/v1/completions", headers=headers),
            httpx.get(f"{server.url}/healthz"), httpx.get(f"{server.url}/readyz"),
            *[httpx.get(f"{server.url}/no/such/{i}") for i in range(3)]]
    after = _scrape(server)
    assert [r.status_code for r in sent] == [400, 422, 413, 405, 200, 200, 404, 404, 404]

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    for endpoint, status in (("completions", "400"), ("chat.completions", "422"), ("completions", "413"),
                             ("completions", "405"), ("healthz", "200"), ("readyz", "200"), ("metrics", "200")):
        assert delta("lmctl_requests_total", endpoint=endpoint, status=status) == 1, (endpoint, status)
    # unknown paths share one label, so no client can grow the metrics without bound
    assert delta("lmctl_requests_total", endpoint="other", status="404") == 3
    assert delta("lmctl_request_errors_total", endpoint="other", status="404") == 3
    assert {dict(k)["endpoint"] for k in after["lmctl_requests_total"]} <= {
        "completions", "chat.completions", "models", "healthz", "readyz", "metrics", "other"}
    assert delta("lmctl_request_latency_seconds_count", endpoint="completions") == 3


@pytest.mark.parametrize("fields", [
    {"seed": 2**64}, {"seed": -(2**63) - 1}, {"seed": 1.5}, {"seed": True},
    {"max_tokens": True}, {"max_tokens": 8.0}, {"max_tokens": 0}, {"max_tokens": "8"}, {"max_tokens": 2**31},
    {"temperature": 2.5}, {"temperature": -0.1}, {"temperature": True}, {"temperature": "0.5"},
    {"top_p": 0}, {"top_p": 1.5}, {"n": 2}, {"n": True}, {"stream_options": {"include_usage": 1}},
], ids=lambda fields: ",".join(f"{k}={v!r}" for k, v in fields.items()))
def test_every_number_is_bounded_and_strictly_typed(server: Server, fields: dict[str, object]) -> None:
    """Sent through the SDK, which passes the values on as given: each is a 422 naming its field
    (a seed torch cannot take used to fail in the engine; `max_tokens: true` was taken as 1)."""
    name = next(iter(fields))
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        server.client().completions.create(model=MODEL, prompt="x", **fields)  # type: ignore[call-overload]
    assert refused.value.body["type"] == "invalid_request_error"  # type: ignore[index]
    assert refused.value.message.startswith("Error code: 422 - ") and name in str(refused.value.body)


def test_an_out_of_range_seed_is_refused_and_fails_no_neighbour(server: Server) -> None:
    """The issue's reproduction: streams running while a client sends a seed torch cannot take."""
    async def run() -> list[object]:
        client = server.async_client()
        decoding = [asyncio.Event(), asyncio.Event()]

        async def streamed(started: asyncio.Event) -> str:
            chunks = await client.completions.create(model=MODEL, prompt="Once upon", max_tokens=120, temperature=0,
                                                     stream=True)
            text = []
            async for chunk in chunks:
                started.set()
                text.append(chunk.choices[0].text)
            return "".join(text)

        async def bad_seed() -> object:
            for started in decoding:  # both streams are decoding
                await started.wait()
            return await client.completions.create(model=MODEL, prompt="x", max_tokens=4, seed=2**64)

        return await asyncio.gather(*(streamed(e) for e in decoding), bad_seed(), return_exceptions=True)

    alone = server.client().completions.create(model=MODEL, prompt="Once upon", max_tokens=120, temperature=0)
    first, second, refused = asyncio.run(run())
    assert first == second == alone.choices[0].text
    assert isinstance(refused, openai.UnprocessableEntityError) and "seed" in refused.message
    server.assert_clean_log()


def test_chat_numbers_are_strict_too(server: Server) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    for fields in ({"max_completion_tokens": True}, {"max_completion_tokens": 2**31}, {"seed": 2**63}):
        with pytest.raises(openai.UnprocessableEntityError, match=next(iter(fields))):
            server.client().chat.completions.create(model=MODEL, messages=messages, **fields)  # type: ignore[call-overload, arg-type]


def test_a_body_must_be_utf8_json_sent_as_json(server: Server) -> None:
    """Raw HTTP, since the SDK always sends UTF-8 JSON with its Content-Type."""
    url, auth = f"{server.url}/v1/completions", {"Authorization": f"Bearer {KEY}"}
    body = '{"prompt": "The", "max_tokens": 2}'
    sent_as_json = {**auth, "Content-Type": "application/json"}
    assert httpx.post(url, content=body.encode(), headers=sent_as_json, timeout=60).status_code == 200
    for encoded in (body.encode("utf-16"), body.encode("utf-16-le"), body.encode("utf-32"), b"\xef\xbb\xbf" + body.encode()):
        error = _assert_openai_error(httpx.post(url, content=encoded, headers=sent_as_json, timeout=60),
                                     400, "invalid_request_error")
        assert "not UTF-8" in str(error["message"]) or "not valid JSON" in str(error["message"]), error
    for content_type in (None, "text/plain", "application/x-www-form-urlencoded"):  # curl -d sends the last
        headers = {**auth, **({"Content-Type": content_type} if content_type else {})}
        error = _assert_openai_error(httpx.post(url, content=body.encode(), headers=headers, timeout=60),
                                     415, "invalid_request_error")
        assert "Content-Type: application/json" in str(error["message"]), error
    for broken in (b'{"prompt": "The", "max_tokens": 2', b'{"prompt": "The", "temperature": NaN}', b""):
        error = _assert_openai_error(httpx.post(url, content=broken, headers=sent_as_json, timeout=60),
                                     400, "invalid_request_error")
        assert "not valid JSON" in str(error["message"]), error
    server.assert_clean_log()
