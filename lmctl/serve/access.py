"""Who a request is and what it may spend: the API key check, the key's limits, its usage metrics.

`authenticate` runs before any route (a FastAPI dependency) and names the key on the request's
`Exchange`; `admit` charges the key's buckets once the prompt is tokenized (prompt tokens +
max_tokens reserved); `settle` gives back the unused part and counts tokens and cost by key name
when the request ends. The rate-limit headers an admission computes ride on the `Exchange`, and
the middleware that sends every response adds them (app.RequestEnvelope). Secrets never reach a
log line or a metric: only the key's name does.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from fastapi import HTTPException

from lmctl.serve.keys import Keyring
from lmctl.serve.metrics import Exchange, ServeMetrics
from lmctl.serve.quota import QuotaStore, Refusal, Ticket

log = logging.getLogger("lmctl.serve")
ANONYMOUS = "anonymous"  # the key label when the server has no keys (loopback or --insecure)


class QuotaExceeded(Exception):
    """A key's limit refused the request: 429 in OpenAI's shape (app.py turns it into the response)."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.message)
        self.refusal = refusal

    @property
    def body_type_and_code(self) -> tuple[str, str]:
        if self.refusal.reason == "tokens_per_day":
            return "insufficient_quota", "insufficient_quota"
        # OpenAI's rate-limit errors carry the bucket as their type: "requests" or "tokens"
        return ("requests" if self.refusal.reason == "requests" else "tokens"), "rate_limit_exceeded"

    @property
    def headers(self) -> dict[str, str]:
        # Retry-After in whole seconds (RFC 9110), rounded up so a client that honours it gets in;
        # x-should-retry (the openai SDK's own header) stops its retries where waiting cannot help
        return {"Retry-After": str(max(1, math.ceil(self.refusal.retry_after_s))),
                "x-should-retry": "true" if self.refusal.retry else "false"}


class Access:
    def __init__(self, keyring: Keyring, metrics: ServeMetrics, quota_db: Path | None,
                 cost_per_1k_tokens: float = 0.0) -> None:
        self.keyring, self.metrics, self.cost_per_1k = keyring, metrics, cost_per_1k_tokens
        self.store = QuotaStore(quota_db) if keyring.limited and quota_db is not None else None

    def authenticate(self, authorization: str | None, exchange: Exchange) -> None:
        """Name the key on the exchange, or 401. Only `Authorization: Bearer KEY` is a key (RFC 6750;
        the scheme is case-insensitive); a bare key is refused like a wrong one."""
        if not self.keyring:
            return
        scheme, _, secret = (authorization or "").strip().partition(" ")
        entry = self.keyring.identify(secret.strip()) if scheme.lower() == "bearer" and secret.strip() else None
        if entry is None:
            why = "missing or invalid API key" if scheme.lower() == "bearer" or not authorization else \
                "the Authorization header must be 'Bearer KEY'"
            raise HTTPException(401, why, headers={"WWW-Authenticate": "Bearer"})
        exchange.key = entry
        if self.store is not None:
            exchange.headers.update(self.store.look(entry.name, entry).headers())

    def admit(self, exchange: Exchange, tokens: int) -> None:
        """Charge the exchange's key one request and `tokens` reserved tokens, or raise QuotaExceeded."""
        entry = exchange.key
        if self.store is None or entry is None:
            return
        verdict = self.store.admit(entry.name, entry, tokens)
        exchange.headers.update(verdict.headers())
        if verdict.refusal is not None:
            self.metrics.quota_refusals.labels(entry.name, verdict.refusal.reason).inc()
            log.warning("request %s: key %s refused (%s): %s", exchange.request_id, entry.name,
                        verdict.refusal.reason, verdict.refusal.message)
            raise QuotaExceeded(verdict.refusal)
        exchange.ticket = verdict.ticket

    def refund(self, exchange: Exchange) -> None:
        """The request was admitted but never served: everything it reserved goes back."""
        ticket: Ticket | None = exchange.ticket
        if self.store is not None and ticket is not None:
            self.store.settle(ticket, 0, served=False)

    def settle(self, exchange: Exchange, model: str, version: str, prompt_tokens: int, completion_tokens: int) -> None:
        """The request ended: settle its reservation to the real count, and count it by key name."""
        ticket: Ticket | None = exchange.ticket
        if self.store is not None and ticket is not None:
            self.store.settle(ticket, prompt_tokens + completion_tokens)
        name = exchange.key.name if exchange.key is not None else ANONYMOUS
        m = self.metrics
        m.key_requests.labels(name, model, version).inc()
        m.key_tokens.labels(name, model, version, "prompt").inc(prompt_tokens)
        m.key_tokens.labels(name, model, version, "completion").inc(completion_tokens)
        m.cost.labels(name, model, version).inc((prompt_tokens + completion_tokens) * self.cost_per_1k / 1000)
