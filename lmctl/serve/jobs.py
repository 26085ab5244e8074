"""The request side of the generation engine: sampling settings, jobs and their completions.

A Job is written by the engine's worker thread and read from any thread or event loop:
tokens are appended under a lock, and awaiting coroutines are woken with
`call_soon_threadsafe` on their own loop, never touched from the worker's thread.
`failing_alone` is the one rule for a job's own share of a step: what it raises ends that job only.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger("lmctl.serve.engine")
# What torch.Generator.manual_seed takes is [-2**63, 2**64); a request's seed is an int64, as vLLM's.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


class _Canceller(Protocol):
    def _cancel(self, job: "Job") -> None: ...


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0 -> greedy
    top_p: float = 1.0
    seed: int | None = None  # per-job torch.Generator: reproducible whatever else is batched
    stop_token_ids: frozenset[int] = frozenset()  # the stop token itself is not returned

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise ValueError(f"seed must be a 64-bit signed integer, got {self.seed}")
        object.__setattr__(self, "stop_token_ids", frozenset(int(t) for t in self.stop_token_ids))


@dataclass
class Completion:
    token_ids: list[int]
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    queued_s: float  # submit -> admitted into a batch
    ttft_s: float | None  # submit -> first token
    total_s: float


class QueueFullError(Exception):
    """max_queue jobs are already waiting; the caller should answer 429/503."""


class EngineStoppedError(Exception):
    """The engine is stopping or stopped and takes no new jobs."""


class Job:
    """One request. Its tokens are written by the worker thread and read by any thread or loop."""

    def __init__(self, engine: _Canceller, prompt_ids: list[int], params: SamplingParams) -> None:
        self.id = f"job-{uuid.uuid4().hex[:16]}"
        self.prompt_ids = prompt_ids
        self.prompt_tokens = len(prompt_ids)
        self.params = params
        self.submitted = time.perf_counter()
        self.admitted: float | None = None
        self.first_token: float | None = None
        self.generator: Any = None  # torch.Generator, made by the worker on admission
        self.drafter: Any = None  # lmctl.serve.drafts.NgramDrafter for a greedy job, when the engine drafts
        self.cancel_requested = False
        self._engine = engine
        self._lock = threading.Lock()
        self._tokens: list[int] = []
        self._done = threading.Event()
        self._completion: Completion | None = None
        self._error: BaseException | None = None
        # (loop, event) per awaiting coroutine: the worker wakes each with call_soon_threadsafe,
        # so stream()/result() work from whichever loop awaits them, and the engine never
        # touches an event loop's objects from its own thread.
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    # -- consumer side -------------------------------------------------------------------
    async def stream(self) -> AsyncIterator[int]:
        """Generated token ids as they are produced; ends when done; re-raises an engine error."""
        event = self._subscribe()
        sent = 0
        try:
            while True:
                event.clear()  # before the snapshot, so a token added after it sets the event again
                with self._lock:
                    new, done, error = self._tokens[sent:], self._done.is_set(), self._error
                for token in new:
                    yield token
                sent += len(new)
                if done:
                    if error is not None:
                        raise error
                    return
                await event.wait()
        finally:
            self._unsubscribe(event)

    async def result(self) -> Completion:
        event = self._subscribe()
        try:
            while not self._done.is_set():
                await event.wait()
                event.clear()
        finally:
            self._unsubscribe(event)
        return self._outcome()

    def wait(self, timeout: float | None = None) -> Completion:
        """Block until done (for threads and benchmarks); TimeoutError after `timeout` seconds."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"{self.id} not finished after {timeout} s")
        return self._outcome()

    def cancel(self) -> None:
        """Client gone or timed out: a waiting job ends now, a running one at the next step."""
        self._engine._cancel(self)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def _outcome(self) -> Completion:
        if self._error is not None:
            raise self._error
        assert self._completion is not None
        return self._completion

    def _subscribe(self) -> asyncio.Event:
        loop, event = asyncio.get_running_loop(), asyncio.Event()
        with self._lock:
            self._waiters.append((loop, event))
        return event

    def _unsubscribe(self, event: asyncio.Event) -> None:
        with self._lock:
            self._waiters = [(lp, ev) for lp, ev in self._waiters if ev is not event]

    # -- worker side ---------------------------------------------------------------------
    def _notify(self) -> None:
        with self._lock:
            waiters = list(self._waiters)
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop is closed: its consumer is gone
                pass

    def _emit(self, token: int) -> None:
        with self._lock:
            if self.first_token is None:
                self.first_token = time.perf_counter()
            self._tokens.append(token)
        self._notify()

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        now = time.perf_counter()
        with self._lock:
            if self._done.is_set():
                return
            admitted = self.admitted if self.admitted is not None else now
            self._completion = Completion(
                token_ids=list(self._tokens), finish_reason=reason, prompt_tokens=self.prompt_tokens,
                queued_s=admitted - self.submitted,
                ttft_s=None if self.first_token is None else self.first_token - self.submitted,
                total_s=now - self.submitted)
            self._error = error
            self._done.set()
        self._notify()


@contextmanager
def failing_alone(job: Job) -> Iterator[None]:
    """Run one job's own share of a step (its seeding, draft, sampled token, accepting and
    streaming its tokens): if that raises, the job ends with the error (its client gets a
    500, or an error event once its stream has begun) and the step goes on for every other
    row. Only a failure of the batched forward itself fails a whole step (Engine._step)."""
    try:
        yield
    except Exception as exc:
        log.exception("job %s failed alone (%s); the rest of its batch goes on", job.id, type(exc).__name__)
        job._finish("cancelled", exc)
