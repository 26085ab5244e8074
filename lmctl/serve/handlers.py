"""One completion request from validated body to text: limits, routing, generation, bookkeeping.

`prepare` does everything that can refuse a request (unknown model, too long a prompt, a
full queue) before any response byte is sent, so those failures get proper status codes even
for streaming requests. `Generation` then turns the engine's tokens into text deltas under a
deadline and, whatever happens, records its token metrics, the canary window and the
privacy-safe sample exactly once. Both note on the request's `Exchange` what the middleware that
counts every response cannot see (which version took it, how a stream ended).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import HTTPException

from lmctl.serve.access import Access
from lmctl.serve.canary import Router
from lmctl.serve.guard import OutputGuard
from lmctl.serve.metrics import Exchange, ServeMetrics
from lmctl.serve.sample_log import SampleLog
from lmctl.serve.schemas import ChatRequest, CompletionRequest
from lmctl.serve.settings import ServeSettings
from lmctl.serve.slots import Slot
from lmctl.serve.textstream import TextStream


class GenerationTimeout(Exception):
    pass


@dataclass
class Context:
    router: Router
    settings: ServeSettings
    metrics: ServeMetrics
    sample_log: SampleLog | None
    access: Access
    guard: OutputGuard
    shadow: Any = None  # lmctl.serve.shadow.Shadow with --shadow


@dataclass
class Enqueued:
    exchange: Exchange
    endpoint: str
    slot: Slot
    job: Any
    prompt: str
    messages: list[dict[str, str]] | None
    stops: list[str] | None
    extra: dict[str, Any] = field(default_factory=dict)


def _render(slot: Slot, body: CompletionRequest | ChatRequest) -> tuple[str, list[int], list[dict[str, str]] | None]:
    tok = slot.tokenizer
    if isinstance(body, CompletionRequest):
        return body.prompt, list(tok(body.prompt)["input_ids"]), None
    if not getattr(tok, "chat_template", None):
        raise HTTPException(400, f"model {slot.model_name} has no chat template; use /v1/completions")
    messages = [{"role": m.role, "content": m.content} for m in body.messages]
    text = _apply_template(slot, messages)
    # the template already writes BOS and turn markers; adding special tokens again would double BOS
    return text, list(tok(text, add_special_tokens=False)["input_ids"]), messages


def _apply_template(slot: Slot, messages: list[dict[str, str]]) -> str:
    """The conversation rendered by the model's chat template. Templates refuse conversations
    they cannot render (Gemma's and Mistral's raise_exception on a system turn or roles that do
    not alternate): that is the client's 400, with the template's own words. A template that
    does not parse fails every conversation, so it stays the server's 500."""
    from jinja2 import TemplateError, TemplateSyntaxError

    try:
        return str(slot.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    except TemplateSyntaxError:
        raise
    except TemplateError as exc:
        raise HTTPException(400, f"the chat template of {slot.model_name} refuses this conversation: {exc}") from None


def _check_limits(ctx: Context, slot: Slot, n_prompt: int, max_tokens: int) -> None:
    s = ctx.settings
    if max_tokens > s.max_tokens_cap:
        raise HTTPException(400, f"max_tokens {max_tokens} exceeds this server's cap of {s.max_tokens_cap}")
    limit = s.max_input_tokens or slot.context_length - 1
    if n_prompt > limit:
        raise HTTPException(400, f"prompt has {n_prompt} tokens; this server accepts at most {limit}")
    if n_prompt + max_tokens > slot.context_length:
        raise HTTPException(400, f"prompt ({n_prompt}) + max_tokens ({max_tokens}) exceeds the model context "
                                 f"of {slot.context_length} tokens")


def enqueue(ctx: Context, body: CompletionRequest | ChatRequest, endpoint: str, exchange: Exchange,
            sticky_key: str | None) -> Enqueued:
    """Validate, route and enqueue; raise HTTPException (4xx/503) for anything that refuses the request."""
    from lmctl.serve.engine import EngineStoppedError, QueueFullError, SamplingParams

    names = {slot.model_name for slot in ctx.router.slots()}
    if body.model is not None and body.model not in names:
        raise HTTPException(404, f"model {body.model!r} is not served here (serving {sorted(names)})")
    for _attempt in range(2):  # a hot reload may retire the picked version between pick and submit
        slot = exchange.slot = ctx.router.pick(sticky_key or body.user)
        prompt, ids, messages = _render(slot, body)
        _check_limits(ctx, slot, len(ids), body.token_limit)
        params = SamplingParams(max_tokens=body.token_limit, temperature=body.temperature, top_p=body.top_p,
                                seed=body.seed, stop_token_ids=slot.stop_ids)
        ctx.access.admit(exchange, len(ids) + body.token_limit)  # the key's limits: 429 past them
        try:
            job = slot.engine.submit(ids, params)
        except BaseException as exc:
            ctx.access.refund(exchange)  # admitted, never served: the key gets its reservation back
            if isinstance(exc, QueueFullError):
                raise HTTPException(429, "server busy: request queue is full; retry later",
                                    headers={"Retry-After": "1"}) from None
            if isinstance(exc, EngineStoppedError):
                continue
            if isinstance(exc, ValueError):  # e.g. a token id the model cannot embed
                raise HTTPException(400, str(exc)) from None
            raise
        ctx.metrics.in_flight.labels(slot.model_name, slot.version).inc()
        ctx.metrics.tokens_in.labels(slot.model_name, slot.version).inc(len(ids))
        return Enqueued(exchange, endpoint, slot, job, prompt, messages, body.stop)
    raise HTTPException(503, "model is being replaced; retry")


class Generation:
    def __init__(self, ctx: Context, prep: Enqueued) -> None:
        self.ctx, self.prep = ctx, prep
        self.stream = TextStream(prep.slot.tokenizer, prep.stops)
        self.guarded = ctx.guard.stream()  # what of the text may leave the server
        self.sent: list[str] = []  # the text as the client got it (the sample log records this)
        self.completion_tokens = 0
        self.finish_reason = "length"
        self.status = 500
        self._done = False

    async def deltas(self) -> AsyncIterator[str]:
        """Text deltas until the job ends, a stop string appears or the deadline passes."""
        job, loop = self.prep.job, asyncio.get_running_loop()
        deadline = loop.time() + self.ctx.settings.request_timeout_s
        tokens = job.stream().__aiter__()
        try:
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise GenerationTimeout()
                try:
                    token = await asyncio.wait_for(tokens.__anext__(), remaining)
                except StopAsyncIteration:
                    break
                except asyncio.TimeoutError:
                    raise GenerationTimeout() from None
                self._count_token()
                delta = self.guarded.push(self.stream.push(token))
                if delta:
                    self.sent.append(delta)
                    yield delta
                if self.stream.stopped or self.guarded.refused:
                    job.cancel()
                    break
            tail = self.guarded.finish(self.stream.finish())
            if tail:
                self.sent.append(tail)
                yield tail
            result = await job.result()
            self.finish_reason = "stop" if self.stream.stopped or result.finish_reason == "stop" else "length"
            if self.guarded.refused:
                self.finish_reason = "content_filter"  # as OpenAI ends a response its filter stopped
            self.status = 200
        except GenerationTimeout:
            self.status = 504
            raise
        except asyncio.CancelledError:  # client went away mid-stream
            self.status = 499
            raise
        finally:
            if self.status != 200:
                job.cancel()
            self.close()

    def _count_token(self) -> None:
        slot, started = self.prep.slot, self.prep.exchange.started
        if self.completion_tokens == 0:
            self.ctx.metrics.ttft.labels(slot.model_name, slot.version).observe(time.perf_counter() - started)
        self.completion_tokens += 1
        self.ctx.metrics.tokens_out.labels(slot.model_name, slot.version).inc()

    def close(self) -> None:
        """Token metrics, canary window and sample log, exactly once per request."""
        if self._done:
            return
        self._done = True
        ctx, prep, slot, exchange = self.ctx, self.prep, self.prep.slot, self.prep.exchange
        seconds = time.perf_counter() - exchange.started
        exchange.ended = self.status
        ctx.metrics.in_flight.labels(slot.model_name, slot.version).dec()
        ctx.router.record(slot, ok=self.status < 500, latency_s=seconds)
        ctx.access.settle(exchange, slot.model_name, slot.version, prep.job.prompt_tokens, self.completion_tokens)
        ctx.guard.record(self.guarded, exchange.request_id, slot.model_name, slot.version)
        if ctx.shadow is not None and self.status == 200:
            ctx.shadow.mirror(prep)
        log = ctx.sample_log
        if log is not None and log.wants():
            log.write(request_id=exchange.request_id, model=slot.model_name, version=slot.version,
                      endpoint=prep.endpoint, prompt=prep.prompt, messages=prep.messages, completion="".join(self.sent),
                      prompt_tokens=prep.job.prompt_tokens, completion_tokens=self.completion_tokens,
                      status=self.status, latency_ms=seconds * 1000)

    @property
    def usage(self) -> dict[str, int]:
        n_in = self.prep.job.prompt_tokens
        return {"prompt_tokens": n_in, "completion_tokens": self.completion_tokens,
                "total_tokens": n_in + self.completion_tokens}
