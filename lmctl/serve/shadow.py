"""Shadow traffic: a copy of sampled primary requests goes to a second version after the primary answered.

The copy is submitted when the primary's generation has ended (its response is complete or
its last chunk is on the way), as a task on the server's event loop that nobody awaits, so
the client never waits for it and never sees its output. The shadow generates from the
primary's own prompt token ids with the same sampling parameters, and its token ids are
compared with the primary's:

- a greedy request (temperature 0) without stop strings counts toward agreement: an exact
  match of every generated token id, else the position of the first differing token;
- sampled requests and requests with stop strings (cut at a text boundary, not a token one)
  are mirrored for latency and errors only, counted as `uncompared`.

The shadow takes spare capacity only, never the primary's: a copy waits until the primary's
engine has no request running or waiting, and a copy past `shadow_max_in_flight` waiting or
running ones is skipped (counted). On a saturated server most copies are skipped; the
report says how many. (A first version submitted each copy at once: on a 2-core CPU with the
tiny model that cost the primary's p95 23% at 8 clients, scripts/bench_shadow.py.) With
`--shadow` equal to `--canary` the canary's loaded model is shared, so a rollout can be
gated on agreement (lmctl.serve.rollout) without loading the version twice.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from lmctl import stats
from lmctl.serve.metrics import LATENCY_BUCKETS
from lmctl.serve.slots import Slot

log = logging.getLogger("lmctl.serve")
POSITION_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
LATENCIES_KEPT = 1000  # the report's percentiles are over the latest copies
IDLE_POLL_S = 0.005  # how often waiting copies look for an idle primary
COMPARES = "greedy requests without stop strings: every generated token id of the shadow against the primary's"


def first_difference(primary: list[int], shadow: list[int]) -> int | None:
    """Index of the first differing token id (a length difference counts at the shorter's end); None if equal."""
    for index, (a, b) in enumerate(zip(primary, shadow)):
        if a != b:
            return index
    return None if len(primary) == len(shadow) else min(len(primary), len(shadow))


class ShadowMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["model", "version"]
        self.requests = Counter("lmctl_shadow_requests", "Copies of primary requests for the shadow version, by "
                                "outcome (ok, error, skipped).", [*labels, "outcome"], registry=registry)
        self.comparisons = Counter("lmctl_shadow_comparisons", "Shadow outputs compared with the primary's, by "
                                   "result (match, mismatch, uncompared).", [*labels, "result"], registry=registry)
        self.first_difference = Histogram("lmctl_shadow_first_difference_position", "Token position of the first "
                                          "difference from the primary, for mismatched greedy requests.", labels,
                                          buckets=POSITION_BUCKETS, registry=registry)
        self.latency = Histogram("lmctl_shadow_latency_seconds", "Shadow generation latency, submit to last token.",
                                 labels, buckets=LATENCY_BUCKETS, registry=registry)


class Shadow:
    def __init__(self, slot_of: Callable[[], Slot | None], primary_of: Callable[[], Slot], rate: float,
                 max_in_flight: int, timeout_s: float, registry: CollectorRegistry) -> None:
        self.slot_of, self.primary_of = slot_of, primary_of
        self.rate, self.max_in_flight, self.timeout_s = rate, max_in_flight, timeout_s
        self.metrics = ShadowMetrics(registry)
        self.counts = {"ok": 0, "error": 0, "skipped": 0, "match": 0, "mismatch": 0, "uncompared": 0}
        self.positions: deque[int] = deque(maxlen=LATENCIES_KEPT)
        self.latencies: deque[float] = deque(maxlen=LATENCIES_KEPT)
        self.in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._pending: deque[tuple[Any, bool]] = deque()  # (primary job, comparable) waiting for an idle primary
        self._dispatcher: asyncio.Task[None] | None = None
        self._lock = threading.Lock()
        self._random = random.Random()

    def mirror(self, prep: Any) -> None:
        """Queue a copy of a finished primary request (a handlers.Prepared), if sampled and there is room."""
        slot, primary = self.slot_of(), self.primary_of()
        if slot is None or prep.slot is not primary or self._random.random() >= self.rate:
            return
        with self._lock:
            room = self.in_flight < self.max_in_flight
            if room:
                self.in_flight += 1  # counts waiting copies too: the cap bounds memory as well as work
                self._pending.append((prep.job, prep.job.params.temperature == 0 and not prep.stops))
        if not room:
            return self._count(slot, "skipped")
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch())

    async def _dispatch(self) -> None:
        """Submit waiting copies while the primary is idle (no request running or waiting): the shadow
        takes spare capacity only, so on a busy server copies wait, and past the cap they are skipped."""
        while self._pending:
            primary = self.primary_of().engine
            if primary.running or primary.queue_depth:
                await asyncio.sleep(IDLE_POLL_S)
                continue
            primary_job, comparable = self._pending.popleft()
            slot = self.slot_of()
            if slot is None:
                self._release()
                continue
            params = primary_job.params
            try:
                job = slot.engine.submit(primary_job.prompt_ids, type(params)(
                    max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
                    seed=params.seed, stop_token_ids=slot.stop_ids))
            except Exception as exc:  # a full queue or a stopping engine: the copy is dropped, not retried
                self._release()
                log.info("shadow copy skipped: %s: %s", type(exc).__name__, exc)
                self._count(slot, "skipped")
                continue
            task = asyncio.get_running_loop().create_task(self._follow(slot, job, primary_job, comparable))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _follow(self, slot: Slot, job: Any, primary_job: Any, comparable: bool) -> None:
        started = time.perf_counter()
        try:
            done = await asyncio.wait_for(job.result(), self.timeout_s)
        except Exception as exc:  # the shadow's failure is its metric, never the client's
            job.cancel()
            log.warning("shadow %s version %s failed: %s: %s", slot.model_name, slot.version, type(exc).__name__, exc)
            self._count(slot, "error")
            return
        finally:
            self._release()
        seconds = time.perf_counter() - started
        self.metrics.latency.labels(slot.model_name, slot.version).observe(seconds)
        self._count(slot, "ok", seconds)
        self._compare(slot, primary_job.wait(0).token_ids if comparable else None, done.token_ids)

    def _compare(self, slot: Slot, primary: list[int] | None, shadow: list[int]) -> None:
        position = first_difference(primary, shadow) if primary is not None else None
        result = "uncompared" if primary is None else "match" if position is None else "mismatch"
        self.metrics.comparisons.labels(slot.model_name, slot.version, result).inc()
        with self._lock:
            self.counts[result] += 1
            if position is not None:
                self.positions.append(position)
        if position is not None:
            self.metrics.first_difference.labels(slot.model_name, slot.version).observe(position)

    def _release(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def _count(self, slot: Slot, outcome: str, seconds: float | None = None) -> None:
        self.metrics.requests.labels(slot.model_name, slot.version, outcome).inc()
        with self._lock:
            self.counts[outcome] += 1
            if seconds is not None:
                self.latencies.append(seconds)

    def agreement(self) -> tuple[float | None, int]:
        """(share of compared greedy requests that matched exactly, how many were compared)."""
        with self._lock:
            compared = self.counts["match"] + self.counts["mismatch"]
            return (self.counts["match"] / compared if compared else None), compared

    def report(self) -> dict[str, Any]:
        """The comparison so far, for /healthz and GET /v1/shadow."""
        slot, (agreement, compared) = self.slot_of(), self.agreement()
        with self._lock:
            counts, positions, latencies = dict(self.counts), list(self.positions), list(self.latencies)
        return {
            "ref": slot.ref if slot else None, "model": slot.model_name if slot else None,
            "version": slot.version if slot else None, "primary_version": self.primary_of().version,
            "rate": self.rate, "max_in_flight": self.max_in_flight, "in_flight": self.in_flight,
            "requests": {k: counts[k] for k in ("ok", "error", "skipped")},
            "compares": COMPARES, "compared": compared, "matches": counts["match"],
            "uncompared": counts["uncompared"], "agreement": agreement,
            "first_difference": ({"min": min(positions), "median": stats.percentile(positions, 0.5)}
                                 if positions else None),
            "latency_ms": ({"p50": stats.percentile(latencies, 0.5) * 1000, "p95": stats.percentile(latencies, 0.95) * 1000}
                           if latencies else None),
        }


def attach(router: Any, registry: CollectorRegistry, settings: Any, own: Slot | None) -> Shadow | None:
    """The Shadow of `settings.shadow`, reported on /healthz: its own loaded slot, or the canary's when they share a ref."""
    if settings.shadow is None:
        return None
    primary = router.primary
    slot = own if own is not None else router.canary
    ours, theirs = (primary.describe()["tokenizer_fingerprint"], slot.describe()["tokenizer_fingerprint"])
    if ours and theirs and ours != theirs:
        from lmctl.errors import BadInputError

        raise BadInputError(f"--shadow {settings.shadow}: its tokenizer differs from the primary's, so their token "
                            "ids cannot be compared", hint="shadow a version trained on the same tokenizer")
    shadow = Shadow((lambda: own) if own is not None else (lambda: router.canary), lambda: router.primary,
                    settings.shadow_rate, settings.shadow_max_in_flight, settings.request_timeout_s, registry)
    router.reporters["shadow"] = shadow.report
    return shadow
