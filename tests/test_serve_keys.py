"""API keys with names, rate limits and token quotas, against real `lmctl serve` processes and the openai SDK.

The keys file is written by `lmctl keys add`, as an operator would; requests go through the official
SDK (RateLimitError, its own retry honouring Retry-After, `with_raw_response` for the headers) and
`/metrics` is read with prometheus_client's parser. A second server on the same LMCTL_HOME shows the
limits are shared between processes and outlive the one that counted them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import free_port
from lmctl.serve.keys import add_key
from lmctl.serve.settings import KeyLimits
from http_wait import wait_for_http

MODEL = "tiny"
COST = 2.5
# a Go-style duration, as OpenAI's x-ratelimit-reset-* headers write it: "20ms", "1s", "6m0s", "1h2m3s"
DURATION = re.compile(r"^(\d+ms|(\d+h)?(\d+m)?\d+(\.\d+)?s)$")
KEYS = {  # name: limits
    "burst": ["--requests-per-minute", "2"],
    "tokens": ["--tokens-per-minute", "100"],
    "daily": ["--tokens-per-day", "60"],
    "metered": [],
    "shared": ["--requests-per-minute", "2"],
}


@dataclass
class Servers:
    home: Path
    keys_file: Path
    secrets: dict[str, str]
    model: Path
    urls: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen] = field(default_factory=list)  # type: ignore[type-arg]

    def start(self, count: int) -> None:
        """`count` servers at once on the same LMCTL_HOME, as a user starts them; back once all are ready."""
        for _ in range(count):
            self._launch()
        for url, proc, log in zip(self.urls, self.procs, self.logs_paths()):
            wait_for_http(f"{url}/readyz", timeout=240, proc=proc, log=log)

    def logs_paths(self) -> list[Path]:
        return [self.home / f"serve-{i}.log" for i in range(len(self.procs))]

    def _launch(self) -> None:
        port = free_port()
        env = {**os.environ, "LMCTL_HOME": str(self.home)}
        env.pop("LMCTL_API_KEYS", None)
        cmd = [sys.executable, "-m", "lmctl", "serve", str(self.model), "--port", str(port), "--served-model-name",
               MODEL, "--api-keys-file", str(self.keys_file), "--cost-per-1k-tokens", str(COST),
               "--max-batch-size", "4", "--request-timeout", "600"]
        log = self.home / f"serve-{len(self.procs)}.log"
        with open(log, "w") as sink:
            proc = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT)
        self.urls.append(f"http://127.0.0.1:{port}")
        self.procs.append(proc)

    def client(self, name: str, url: str | None = None, **kwargs: object) -> openai.OpenAI:
        options: dict[str, object] = {"max_retries": 0, "timeout": 600, "api_key": self.secrets.get(name, name), **kwargs}
        return openai.OpenAI(base_url=f"{url or self.urls[0]}/v1", **options)  # type: ignore[arg-type]

    def logs(self) -> str:
        return "".join(p.read_text() for p in sorted(self.home.glob("serve-*.log")))


@pytest.fixture(scope="module")
def servers(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    home = tmp_path_factory.mktemp("keys-home")
    keys_file = home / "keys.yaml"
    secrets = {}
    for name, limits in KEYS.items():
        if name == "burst":  # the operator's way: `lmctl keys add`, the key printed once
            out = subprocess.run([sys.executable, "-m", "lmctl", "keys", "add", str(keys_file), "--name", name,
                                  *limits, "--json"], capture_output=True, text=True, check=True)
            secrets[name] = json.loads(out.stdout)["key"]
        else:  # the same function, in process: each CLI start costs seconds on a loaded machine
            flags = dict(zip(limits[::2], limits[1::2]))
            secrets[name] = add_key(keys_file, name, KeyLimits(**{f[2:].replace("-", "_"): int(v)
                                                                  for f, v in flags.items()}))[0]
    state = Servers(home, keys_file, secrets, tiny_base)
    state.start(2)  # two server processes sharing one LMCTL_HOME, as two workers of one host
    yield state
    for proc in state.procs:
        proc.send_signal(signal.SIGTERM)
    for proc in state.procs:
        assert proc.wait(timeout=180) in (0, -signal.SIGTERM), state.logs()[-3000:]


def _completion(client: openai.OpenAI, prompt: str = "Hello", max_tokens: int = 4):  # type: ignore[no-untyped-def]
    return client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0)


def test_the_keys_file_holds_hashes_only(servers: Servers) -> None:
    text = servers.keys_file.read_text()
    assert all(secret not in text for secret in servers.secrets.values())
    assert text.count("sha256:") == len(KEYS) and oct(servers.keys_file.stat().st_mode & 0o777) == "0o600"


def test_bare_key_without_bearer_is_401_in_openai_shape(servers: Servers) -> None:
    url = f"{servers.urls[0]}/v1/models"
    bare = httpx.get(url, headers={"Authorization": servers.secrets["metered"]})
    assert bare.status_code == 401 and bare.json()["error"]["type"] == "authentication_error"
    assert "Bearer" in bare.json()["error"]["message"]
    assert httpx.get(url, headers={"Authorization": "Bearer wrong-key"}).status_code == 401
    assert httpx.get(url, headers={"Authorization": f"bearer {servers.secrets['metered']}"}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        servers.client("lmctl-not-a-key").models.list()


def test_requests_per_minute_headers_and_rate_limit_error(servers: Servers) -> None:
    client = servers.client("burst")
    seen = []
    for _ in range(2):
        raw = client.completions.with_raw_response.create(model=MODEL, prompt="Hi", max_tokens=2, temperature=0)
        seen.append(raw.headers)
        assert raw.parse().choices[0].text is not None
    assert [h["x-ratelimit-limit-requests"] for h in seen] == ["2", "2"]
    assert [h["x-ratelimit-remaining-requests"] for h in seen] == ["1", "0"]
    assert all(DURATION.match(h["x-ratelimit-reset-requests"]) for h in seen), [h["x-ratelimit-reset-requests"] for h in seen]
    assert "x-ratelimit-limit-tokens" not in seen[0]  # this key has no token limit
    with pytest.raises(openai.RateLimitError) as caught:
        _completion(client)
    err = caught.value
    assert err.code == "rate_limit_exceeded" and err.type == "requests"
    assert 25 <= int(err.response.headers["retry-after"]) <= 30  # one request refills in 30 s at 2 a minute
    assert err.response.headers["x-ratelimit-remaining-requests"] == "0"
    # every response of a limited key carries the headers: a listing, a refused body
    assert servers.client("burst").models.with_raw_response.list().headers["x-ratelimit-limit-requests"] == "2"
    bad = httpx.post(f"{servers.urls[0]}/v1/completions", json={"prompt": ""},
                     headers={"Authorization": f"Bearer {servers.secrets['burst']}"})
    assert bad.status_code == 422 and bad.headers["x-ratelimit-remaining-requests"] == "0"


def test_sdk_retry_waits_as_long_as_retry_after_says(servers: Servers) -> None:
    statuses: list[tuple[int, str | None]] = []
    hooks = {"response": [lambda r: statuses.append((r.status_code, r.headers.get("retry-after")))]}
    client = servers.client("tokens", max_retries=2, http_client=httpx.Client(event_hooks=hooks))
    # fill most of the 100-tokens-a-minute bucket: a long prompt, one token generated
    big = client.completions.with_raw_response.create(model=MODEL, prompt="the model " * 40,
                                                      max_tokens=1, temperature=0)
    used = big.parse().usage.total_tokens  # type: ignore[union-attr]
    assert 70 <= used <= 99, used  # the reservation was settled to what the request used
    assert int(big.headers["x-ratelimit-remaining-tokens"]) <= 100 - used + 1
    started = time.monotonic()
    small = _completion(client, max_tokens=20)  # needs ~22 tokens: over the limit until some drain back
    waited = time.monotonic() - started
    assert small.choices and [s for s, _ in statuses[1:]] == [429, 200], statuses
    retry_after = int(statuses[1][1])  # type: ignore[arg-type]
    assert 1 <= retry_after <= 30 and waited >= retry_after, (retry_after, waited)


def test_spent_daily_budget_is_insufficient_quota_and_not_retried(servers: Servers) -> None:
    calls: list[int] = []
    client = servers.client("daily", max_retries=3,
                            http_client=httpx.Client(event_hooks={"response": [lambda r: calls.append(r.status_code)]}))
    first = _completion(client, max_tokens=4)
    assert first.usage is not None and first.usage.total_tokens < 60
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError) as caught:
        _completion(client, max_tokens=58)
    assert caught.value.code == "insufficient_quota" and caught.value.type == "insufficient_quota"
    headers = caught.value.response.headers
    assert headers["x-should-retry"] == "false" and int(headers["retry-after"]) <= 86400
    assert calls == [200, 429] and time.monotonic() - started < 5  # the SDK did not retry a spent budget


def test_token_counters_and_cost_by_key_name(servers: Servers) -> None:
    client = servers.client("metered")
    usages = [_completion(client, prompt=p, max_tokens=5).usage for p in ("Count to ten", "The model")]
    prompt = sum(u.prompt_tokens for u in usages if u)
    completion = sum(u.completion_tokens for u in usages if u)
    text = httpx.get(f"{servers.urls[0]}/metrics").text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}

    def value(name: str, **labels: str) -> float:
        matching = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls)]
        return sum(matching)

    assert value("lmctl_key_tokens_total", key="metered", kind="prompt") == prompt
    assert value("lmctl_key_tokens_total", key="metered", kind="completion") == completion
    assert value("lmctl_key_requests_total", key="metered") == 2
    assert value("lmctl_cost_total", key="metered") == pytest.approx((prompt + completion) * COST / 1000)
    assert value("lmctl_quota_refusals_total", key="burst", reason="requests") >= 1
    assert all(secret not in text for secret in servers.secrets.values())


def test_limits_are_shared_by_a_second_process(servers: Servers) -> None:
    """The second server (another worker on the same LMCTL_HOME, or the first restarted) counts against the
    same limits: what one server charged, the other refuses."""
    first, second = servers.urls
    for _ in range(2):
        _completion(servers.client("shared", url=first), max_tokens=1)
    with pytest.raises(openai.RateLimitError) as caught:
        _completion(servers.client("shared", url=second), max_tokens=1)
    assert caught.value.response.headers["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(openai.RateLimitError) as spent:  # the daily budget the first server saw spent
        _completion(servers.client("daily", url=second), max_tokens=58)
    assert spent.value.code == "insufficient_quota"


def test_no_secret_reaches_a_log(servers: Servers) -> None:
    logs = servers.logs()
    assert "key burst refused" in logs  # the refusals are logged, by name
    assert all(secret not in logs for secret in servers.secrets.values())
