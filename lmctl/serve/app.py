"""The FastAPI application: OpenAI-style routes, health, metrics, auth and request ids.

FastAPI resolves endpoint annotations from module globals, so this module imports it at the
top; only `lmctl serve` (and tests) import this module.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmctl.serve.access import QuotaExceeded
from lmctl.serve.body import JsonBodyRoute
from lmctl.serve.handlers import Context, Generation, GenerationTimeout, enqueue
from lmctl.serve.metrics import Exchange
from lmctl.serve.schemas import ChatRequest, CompletionRequest, error_body

log = logging.getLogger("lmctl.serve")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# OpenAI's error types; any other 4xx is an invalid_request_error, any other 5xx a server_error
_KINDS = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error", 503: "service_unavailable",
          504: "timeout"}
# the metrics' endpoint label of each route; every other path counts as "other"
_ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat.completions", "/v1/models": "models",
              "/healthz": "healthz", "/readyz": "readyz", "/metrics": "metrics", "/v1/shadow": "shadow"}
Scope = dict[str, Any]
Message = dict[str, Any]


class RequestEnvelope:
    """Pure ASGI middleware around every request: a request id on every response (the client's
    X-Request-Id when it is sane, else a new one), the body size limit, enforced on the bytes
    actually received so a chunked upload without Content-Length cannot get around it, and the
    one place every response is counted (lmctl.serve.metrics). An exception no handler took
    becomes a 500 in OpenAI's error shape here: Starlette's outermost middleware would answer
    one too, but then re-raises it to uvicorn, which logs an ASGI crash with a traceback."""

    def __init__(self, app: Any, max_body_bytes: int, ctx: Context) -> None:
        self.app, self.max_body, self.ctx = app, max_body_bytes, ctx

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode().lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        given = headers.get("x-request-id", "")
        exchange = Exchange(given if _REQUEST_ID.match(given) else f"req-{uuid.uuid4().hex}", time.perf_counter())
        scope.setdefault("state", {})["exchange"] = exchange

        async def send_noted(message: Message) -> None:
            if message["type"] == "http.response.start":
                exchange.sent = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", exchange.request_id.encode()),
                                                  *[(k.encode(), v.encode()) for k, v in exchange.headers.items()]]}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                exchange.complete = True
            await send(message)

        try:
            await self._within_limit(scope, receive, send_noted, headers.get("content-length", ""))
        except Exception as exc:
            # one line, never the request body: it may hold personal data
            log.error("request %s failed: %s: %s", exchange.request_id, type(exc).__name__, exc)
            exchange.ended = 500
            if exchange.sent is None:  # else the client sees the response cut short
                await _error_response(500, "internal error")(scope, receive, send_noted)
        finally:
            slot = exchange.slot or self.ctx.router.primary
            self.ctx.metrics.finished(slot.model_name, slot.version, _ENDPOINTS.get(scope["path"], "other"),
                                      exchange.status, time.perf_counter() - exchange.started)

    async def _within_limit(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                            send: Callable[[Message], Awaitable[None]], declared: str) -> None:
        """The app, with the request body read up to the limit first (413 past it)."""
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        body = b"" if not declared.isdigit() or int(declared) <= self.max_body else None
        more = body is not None
        while more:
            message = await receive()
            body += message.get("body", b"")  # type: ignore[operator]
            more = message.get("more_body", False) and len(body) <= self.max_body  # type: ignore[arg-type]
        if body is None or len(body) > self.max_body:
            return await _error_response(413, f"request body exceeds {self.max_body} bytes")(scope, receive, send)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _error_response(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    kind = _KINDS.get(status, "invalid_request_error" if status < 500 else "server_error")
    return JSONResponse(error_body(message, kind), status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    """Every error body in OpenAI's shape. Starlette's HTTPException (FastAPI's is a subclass) is
    what routing raises for an unknown path (404), a wrong method (405) and a body that does not
    parse (400), so the handler is registered for it, not for FastAPI's alone."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error_response(exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in exc.errors())
        return _error_response(422, problems or "invalid request")

    @app.exception_handler(QuotaExceeded)
    async def over_quota(_request: Request, exc: QuotaExceeded) -> JSONResponse:
        kind, code = exc.body_type_and_code
        return JSONResponse(error_body(str(exc), kind, code), status_code=429, headers=exc.headers)

    @app.exception_handler(GenerationTimeout)
    async def timeout(_request: Request, _exc: GenerationTimeout) -> JSONResponse:
        return _error_response(504, "generation timed out")


def _key_checker(ctx: Context) -> Callable[[Request], None]:
    def check_key(request: Request) -> None:
        ctx.access.authenticate(request.headers.get("authorization"), request.state.exchange)

    return check_key


def _head(gen: Generation, rid: str, chat: bool, stream: bool) -> dict[str, Any]:
    """The fields every response object and every stream chunk of one request share (OpenAI's
    SDK stitches chunks, the usage chunk included, by these)."""
    slot = gen.prep.slot
    kind = ("chat.completion.chunk" if stream else "chat.completion") if chat else "text_completion"
    return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{rid}", "object": kind, "created": int(time.time()),
            "model": slot.model_name, "system_fingerprint": f"{slot.model_name}:{slot.version}"}


def _completion_body(gen: Generation, text: str, chat: bool, rid: str) -> dict[str, Any]:
    choice: dict[str, Any] = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": gen.finish_reason}
                              if chat else {"text": text, "index": 0, "logprobs": None, "finish_reason": gen.finish_reason})
    return {**_head(gen, rid, chat, stream=False), "choices": [choice], "usage": gen.usage}


def _chunk(head: dict[str, Any], chat: bool, delta: dict[str, Any] | str, finish: str | None) -> str:
    choice: dict[str, Any] = ({"index": 0, "delta": delta, "finish_reason": finish} if chat
                              else {"text": delta, "index": 0, "logprobs": None, "finish_reason": finish})
    return f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"


async def _sse(gen: Generation, rid: str, chat: bool, include_usage: bool) -> AsyncIterator[str]:
    head = _head(gen, rid, chat, stream=True)  # one id and `created` for the whole stream
    if chat:
        yield _chunk(head, chat, {"role": "assistant", "content": ""}, None)
    try:
        async for delta in gen.deltas():
            yield _chunk(head, chat, {"content": delta} if chat else delta, None)
    except GenerationTimeout:  # headers are gone: the error travels as an event, as OpenAI's API does
        yield f"data: {json.dumps(error_body('generation timed out', 'timeout'))}\n\n"
    except Exception as exc:
        log.error("stream %s failed: %s: %s", rid, type(exc).__name__, exc)
        yield f"data: {json.dumps(error_body('internal error while generating', 'server_error'))}\n\n"
    else:
        yield _chunk(head, chat, {} if chat else "", gen.finish_reason)
        if include_usage:  # OpenAI's usage chunk: the same head, no choices
            yield f"data: {json.dumps({**head, 'choices': [], 'usage': gen.usage})}\n\n"
    yield "data: [DONE]\n\n"


def create_app(ctx: Context, follower: Any = None) -> FastAPI:
    """The app over a router of loaded slots; `follower` (hot reload) starts and stops with it.
    Ready (/readyz 200) once the warm-up generation ran (lmctl.serve.warmup), not before."""
    state: dict[str, Any] = {"ready": False, "warmup": {"status": "pending"}}

    async def warm() -> None:
        from lmctl.serve.warmup import warm_up

        settings = ctx.settings
        if settings.warmup_tokens == 0:
            state["warmup"], state["ready"] = {"status": "off"}, True
            return
        state["warmup"] = {"status": "running"}
        try:
            state["warmup"] = await warm_up(ctx.router.slots(), settings.warmup_tokens)
        except Exception as exc:  # never ready: a model that cannot generate must get no traffic
            log.error("warm-up generation failed, staying not ready: %s: %s", type(exc).__name__, exc)
            state["warmup"] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
            return
        state["ready"] = True

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if follower is not None:
            follower.start()
        warming = asyncio.create_task(warm())
        yield
        warming.cancel()
        state["ready"] = False  # draining: load balancers stop sending before the engines stop
        if follower is not None:
            follower.stop()
        for slot in ctx.router.slots():
            slot.engine.stop(drain=True, timeout=ctx.settings.request_timeout_s)

    app = FastAPI(title="lmctl", version="1", lifespan=lifespan)
    app.router.route_class = JsonBodyRoute  # UTF-8 JSON bodies sent as JSON (lmctl.serve.body)
    app.add_middleware(RequestEnvelope, max_body_bytes=ctx.settings.max_body_bytes, ctx=ctx)
    _install_error_handlers(app)
    auth = [Depends(_key_checker(ctx))]

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        reloads = list(follower.events)[-10:] if follower is not None else []
        return {"status": "ok", **ctx.router.state(), "reloads": reloads, "warmup": state["warmup"]}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        primary = ctx.router.primary
        if not state["ready"]:
            warming = state["warmup"]["status"] in ("pending", "running")
            why = "warming up" if warming else ("warm-up failed" if state["warmup"]["status"] == "failed"
                                                 else "starting or draining")
            return JSONResponse({"status": "not_ready", "why": why}, status_code=503)
        return JSONResponse({"status": "ready", "model": primary.model_name, "version": primary.version,
                             "verified": primary.loaded.manifest is not None or primary.loaded.ref.kind != "checkpoint"})

    @app.get("/metrics")
    def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=auth)
    def models() -> dict[str, Any]:
        slots = ctx.router.slots()
        primary = ctx.router.primary
        return {"object": "list", "data": [{"id": primary.model_name, "object": "model", "created": 0, "owned_by": "lmctl",
                                            "versions": [s.describe() for s in slots]}]}

    @app.get("/v1/shadow", dependencies=auth)
    def shadow() -> dict[str, Any]:
        if ctx.shadow is None:
            raise HTTPException(404, "no shadow version: start the server with --shadow MODEL_REF")
        return dict(ctx.shadow.report())

    async def run(request: Request, body: CompletionRequest | ChatRequest, endpoint: str) -> Response:
        exchange: Exchange = request.state.exchange
        rid = exchange.request_id
        prep = enqueue(ctx, body, endpoint, exchange, request.headers.get("x-client-id"))
        gen, chat = Generation(ctx, prep), endpoint == "chat.completions"
        headers = {"X-Model-Version": prep.slot.version}
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(_sse(gen, rid, chat, usage), media_type="text/event-stream", headers=headers)
        text = "".join([delta async for delta in gen.deltas()])
        return JSONResponse(_completion_body(gen, text, chat, rid), headers=headers)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request, body: CompletionRequest) -> Response:
        return await run(request, body, "completions")

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(request: Request, body: ChatRequest) -> Response:
        return await run(request, body, "chat.completions")

    return app
