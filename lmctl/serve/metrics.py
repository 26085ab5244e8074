"""Prometheus metrics of one server, each labeled with the model name and version.

A private CollectorRegistry per app (not the process-global one) so two apps in one
process, as in tests, never collide. Queue depth and running batch size are read from the
engines at scrape time by a custom collector, so they can never go stale. Requests are counted
in one place, the middleware around every request (app.RequestEnvelope), which sees every
response (413s it sends itself, 404s for unknown routes, 500s); an `Exchange` carries what the
handlers know and it does not: which version took the request, how a stream ended after its 200.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from lmctl.serve.keys import KeyEntry
    from lmctl.serve.quota import Ticket
    from lmctl.serve.slots import Slot

# Buckets span a tiny test model's milliseconds up to a big model's minute-long completion.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass
class Exchange:
    """One HTTP request and its response, as the metrics count it."""

    request_id: str
    started: float  # time.perf_counter() at arrival
    slot: Slot | None = None  # the version that took (or refused at its limits) the request, once picked
    sent: int | None = None  # the status line sent
    complete: bool = False  # the last body byte went out
    ended: int | None = None  # how the generation ended: after a stream's 200, a timeout (504) or a failure (500)
    key: KeyEntry | None = None  # the API key that authenticated it (lmctl.serve.access)
    ticket: Ticket | None = None  # what its key's quota reserved for it, until settled
    headers: dict[str, str] = field(default_factory=dict)  # added to the response: the key's x-ratelimit-*

    @property
    def status(self) -> int:
        """The status the request counts as: the one sent, except a 200 whose stream then failed
        (how it ended) or that never finished (499, nginx's "client closed request")."""
        if self.sent is None:  # nothing was sent: the app broke before it could answer
            return 500
        if self.sent == 200 and self.ended not in (None, 200):
            return self.ended
        return self.sent if self.complete else 499


class _EngineCollector:
    """Queue depth, running requests and draft tokens of every live slot, read at scrape time."""

    def __init__(self, slots: Callable[[], Iterable[Any]]) -> None:
        self._slots = slots

    def collect(self) -> Iterator[Metric]:
        queue = GaugeMetricFamily("lmctl_queue_depth", "Requests waiting for a batch slot.", labels=["model", "version"])
        running = GaugeMetricFamily("lmctl_batch_running", "Requests in the current generation batch.",
                                    labels=["model", "version"])
        drafts = CounterMetricFamily("lmctl_draft_tokens", "Prompt-lookup draft tokens fed to the model, by whether "
                                     "its own greedy choice accepted them.", labels=["model", "version", "outcome"])
        for slot in self._slots():
            labels, engine = [slot.model_name, slot.version], slot.engine
            queue.add_metric(labels, engine.queue_depth)
            running.add_metric(labels, engine.running)
            drafts.add_metric([*labels, "accepted"], engine.accepted)
            drafts.add_metric([*labels, "rejected"], engine.drafted - engine.accepted)
        yield queue
        yield running
        yield drafts


class ServeMetrics:
    def __init__(self, slots: Callable[[], Iterable[Any]]) -> None:
        self.registry = CollectorRegistry()
        labels = ["model", "version"]
        r = self.registry
        self.latency = Histogram("lmctl_request_latency_seconds", "Request latency, arrival to last byte.",
                                 labels + ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("lmctl_time_to_first_token_seconds", "Arrival to first generated token.",
                              labels, buckets=LATENCY_BUCKETS, registry=r)
        self.tokens_in = Counter("lmctl_tokens_in", "Prompt tokens received.", labels, registry=r)
        self.tokens_out = Counter("lmctl_tokens_out", "Completion tokens generated.", labels, registry=r)
        # endpoint: a route's name, or "other" for any unknown path (bounded: a label per path
        # would let any client grow the metrics without bound)
        self.requests = Counter("lmctl_requests", "Responses sent, by endpoint and HTTP status.",
                                labels + ["endpoint", "status"], registry=r)
        self.errors = Counter("lmctl_request_errors", "Failed requests (4xx/5xx), by endpoint and HTTP status.",
                              labels + ["endpoint", "status"], registry=r)
        self.in_flight = Gauge("lmctl_requests_in_flight", "Requests being handled.", labels, registry=r)
        self.canary_rollbacks = Counter("lmctl_canary_rollbacks", "Automatic canary rollbacks.", labels, registry=r)
        # version: the version the alias moved to (swapped in, or refused and never served)
        self.reloads = Counter("lmctl_model_reloads", "Alias moves followed, by the version moved to and outcome.",
                               labels + ["outcome"], registry=r)
        # by API key name (never the secret); "anonymous" when the server has no keys
        self.key_requests = Counter("lmctl_key_requests", "Generation requests served, by API key name.",
                                    ["key", *labels], registry=r)
        self.key_tokens = Counter("lmctl_key_tokens", "Tokens by API key name and kind (prompt or completion).",
                                  ["key", *labels, "kind"], registry=r)
        self.cost = Counter("lmctl_cost", "Cost of the tokens served (prompt + completion) at --cost-per-1k-tokens, "
                            "by API key name.", ["key", *labels], registry=r)
        self.quota_refusals = Counter("lmctl_quota_refusals", "Requests refused by an API key's limits, by reason: "
                                      "requests, tokens (per minute), tokens_per_day, too_large.",
                                      ["key", "reason"], registry=r)
        # kind: a lmctl.pii kind or "deny"; action: flag, redact or refuse (--output-guard)
        self.guard_events = Counter("lmctl_output_guard_events", "Findings of the output guard in generated text, "
                                    "by kind and the action taken.", ["kind", "action", *labels], registry=r)
        r.register(_EngineCollector(slots))  # type: ignore[arg-type]

    def finished(self, model: str, version: str, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(model, version, endpoint, str(status)).inc()
        if status >= 400:
            self.errors.labels(model, version, endpoint, str(status)).inc()
        self.latency.labels(model, version, endpoint).observe(seconds)
