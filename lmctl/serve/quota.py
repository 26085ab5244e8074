"""Per-key rate limits and token budgets, kept in a SQLite file so they hold across processes and restarts.

Requests and tokens a minute are token buckets, as OpenAI describes its own limits: a key may use
its whole minute at once, and use refills evenly (limit/60 a second). Each bucket is stored as the
amount `used` at time `at`; it drains at limit/60 a second, so a limit changed in the keys file
applies at once. Tokens a day are a fixed UTC-day budget.

Tokens are charged before generation, when only the prompt is known: prompt tokens + max_tokens
are reserved (OpenAI counts max_tokens the same way), and once the request ends the unused part
is given back, so the counters hold the real prompt + completion tokens. A request refused by
any limit charges nothing.

Every admission is one `BEGIN IMMEDIATE` transaction on the file (WAL journal), so several
`lmctl serve` processes sharing LMCTL_HOME on one host share the limits exactly, and a restart or
hot reload starts from where the counters were. Replicas on different hosts each have their own
file: the limits are per replica there (docs/operations.md). Hand-written: the rate-limit
libraries for ASGI (slowapi, limits) count requests, not a token reservation settled afterwards.
"""

from __future__ import annotations

import math
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from lmctl.serve.settings import KeyLimits

_SCHEMA = """
CREATE TABLE IF NOT EXISTS buckets (key TEXT, kind TEXT, used REAL, at REAL, PRIMARY KEY (key, kind));
CREATE TABLE IF NOT EXISTS days (key TEXT, day TEXT, spent INTEGER, PRIMARY KEY (key, day));
"""


def go_duration(seconds: float) -> str:
    """A duration as OpenAI's x-ratelimit-reset-* headers write it: "20ms", "1s", "6m0s", "1h2m3s"."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms" if seconds > 0 else "0s"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{secs:.3f}".rstrip("0").rstrip(".") + "s"
    if hours >= 1:
        return f"{int(hours)}h{int(minutes)}m{text}"
    return f"{int(minutes)}m{text}" if minutes >= 1 else text


def _seconds_to_midnight(now: float) -> float:
    day = datetime.fromtimestamp(now, timezone.utc)
    return 86400 - (day.hour * 3600 + day.minute * 60 + day.second + day.microsecond / 1e6)


def _day(now: float) -> str:
    return datetime.fromtimestamp(now, timezone.utc).strftime("%Y-%m-%d")


@dataclass
class Bucket:
    """One minute-bucket's state after an admission (or a look)."""

    limit: int
    used: float

    @property
    def remaining(self) -> int:
        return max(0, math.floor(self.limit - self.used))

    @property
    def reset_s(self) -> float:
        """Seconds until the bucket is full again."""
        return self.used * 60 / self.limit


@dataclass
class Refusal:
    reason: str  # requests | tokens | tokens_per_day | too_large
    message: str
    retry_after_s: float
    retry: bool  # whether retrying later can succeed at all


@dataclass
class Ticket:
    """What one admitted request holds: its reservation, to be settled once."""

    key: str
    reserved: int
    day: str
    settled: bool = False


@dataclass
class Verdict:
    buckets: dict[str, Bucket] = field(default_factory=dict)  # "requests" / "tokens"
    refusal: Refusal | None = None
    ticket: Ticket | None = None

    def headers(self) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers for each limited bucket."""
        out = {}
        for kind, b in self.buckets.items():
            out[f"x-ratelimit-limit-{kind}"] = str(b.limit)
            out[f"x-ratelimit-remaining-{kind}"] = str(b.remaining)
            out[f"x-ratelimit-reset-{kind}"] = go_duration(b.reset_s)
        return out


class QuotaStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._local = threading.local()
        self._db().executescript(_SCHEMA)  # its own transaction: executescript commits first
        with self._tx() as db:  # days before yesterday can no longer refuse anything
            db.execute("DELETE FROM days WHERE day < ?", (_day(time.time() - 86400),))

    def _db(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=10, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    def _tx(self) -> "_Transaction":
        return _Transaction(self._db())

    def look(self, key: str, limits: KeyLimits, now: float | None = None) -> Verdict:
        """The buckets as they stand, charging nothing (headers for responses that spend nothing)."""
        now = time.time() if now is None else now
        with self._tx() as db:
            return Verdict(self._buckets(db, key, limits, now))

    def admit(self, key: str, limits: KeyLimits, tokens: int, now: float | None = None) -> Verdict:
        """Charge one request and `tokens` reserved tokens, or refuse and charge nothing."""
        now = time.time() if now is None else now
        with self._tx() as db:
            buckets = self._buckets(db, key, limits, now)
            refusal = _check(buckets, limits, tokens, self._spent(db, key, now), now)
            if refusal is not None:
                return Verdict(buckets, refusal)
            cost = {"requests": 1, "tokens": tokens}
            for kind, b in buckets.items():
                b.used += cost[kind]
                db.execute("REPLACE INTO buckets VALUES (?, ?, ?, ?)", (key, kind, b.used, now))
            day = _day(now)
            db.execute("INSERT INTO days VALUES (?, ?, ?) ON CONFLICT (key, day) DO UPDATE SET spent = spent + ?",
                       (key, day, tokens, tokens))
            return Verdict(buckets, ticket=Ticket(key, tokens, day))

    def settle(self, ticket: Ticket, used_tokens: int, served: bool = True) -> None:
        """Give back what the request reserved and did not use (everything, with the request
        itself, when it was never served), once."""
        if ticket.settled:
            return
        ticket.settled = True
        refund = max(0, ticket.reserved - used_tokens) if served else ticket.reserved
        with self._tx() as db:
            back = {"tokens": refund, "requests": 0 if served else 1}
            for kind, amount in back.items():
                if amount:
                    db.execute("UPDATE buckets SET used = MAX(0, used - ?) WHERE key = ? AND kind = ?",
                               (amount, ticket.key, kind))
            db.execute("UPDATE days SET spent = MAX(0, spent - ?) WHERE key = ? AND day = ?",
                       (refund, ticket.key, ticket.day))

    def _buckets(self, db: sqlite3.Connection, key: str, limits: KeyLimits, now: float) -> dict[str, Bucket]:
        out = {}
        for kind, limit in (("requests", limits.requests_per_minute), ("tokens", limits.tokens_per_minute)):
            if limit is None:
                continue
            row = db.execute("SELECT used, at FROM buckets WHERE key = ? AND kind = ?", (key, kind)).fetchone()
            used = 0.0 if row is None else max(0.0, row[0] - (now - row[1]) * limit / 60)
            out[kind] = Bucket(limit, used)
        return out

    def _spent(self, db: sqlite3.Connection, key: str, now: float) -> int:
        row = db.execute("SELECT spent FROM days WHERE key = ? AND day = ?", (key, _day(now))).fetchone()
        return 0 if row is None else int(row[0])


def _check(buckets: dict[str, Bucket], limits: KeyLimits, tokens: int, spent: int, now: float) -> Refusal | None:
    """The first limit this request would break, with how long until it would not."""
    if limits.tokens_per_day is not None and spent + tokens > limits.tokens_per_day:
        wait = _seconds_to_midnight(now)
        return Refusal("tokens_per_day", f"this key's daily token budget ({limits.tokens_per_day}) is spent "
                       f"({spent} used, this request needs {tokens}); it renews at 00:00 UTC", wait, retry=False)
    cost = {"requests": 1, "tokens": tokens}
    for kind, b in buckets.items():
        if cost[kind] > b.limit:
            return Refusal("too_large", f"request too large: it needs {cost[kind]} {kind} (prompt + max_tokens) "
                           f"and this key's limit is {b.limit} {kind} per minute", 0.0, retry=False)
        over = b.used + cost[kind] - b.limit
        if over > 0:
            return Refusal(kind, f"rate limit reached for {kind} per minute: limit {b.limit}, used "
                           f"{math.ceil(b.used)}, requested {cost[kind]}", over * 60 / b.limit, retry=True)
    return None


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error): one writer at a time across processes."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type: object, *_rest: object) -> None:
        self.db.execute("ROLLBACK" if exc_type is not None else "COMMIT")
