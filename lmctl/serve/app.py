"""The FastAPI application: OpenAI-style routes, health, metrics, auth and request ids.

FastAPI resolves endpoint annotations from module globals, so this module imports it at the
top; only `lmctl serve` (and tests) import this module.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from lmctl.serve.handlers import Context, Generation, GenerationTimeout, prepare
from lmctl.serve.schemas import ChatRequest, CompletionRequest, error_body

log = logging.getLogger("lmctl.serve")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_KINDS = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable", 504: "timeout"}
_ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat.completions", "/v1/models": "models"}
Scope = dict[str, Any]
Message = dict[str, Any]


class RequestEnvelope:
    """Pure ASGI middleware: a request id on every response (the client's X-Request-Id when it is
    sane, else a new one) and the body size limit, enforced on the bytes actually received so a
    chunked upload without Content-Length cannot get around it."""

    def __init__(self, app: Any, max_body_bytes: int) -> None:
        self.app, self.max_body = app, max_body_bytes

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode().lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        given = headers.get("x-request-id", "")
        request_id = given if _REQUEST_ID.match(given) else f"req-{uuid.uuid4().hex}"
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send_with_id)
        declared = headers.get("content-length", "")
        body = b"" if not declared.isdigit() or int(declared) <= self.max_body else None
        more = body is not None
        while more:
            message = await receive()
            body += message.get("body", b"")  # type: ignore[operator]
            more = message.get("more_body", False) and len(body) <= self.max_body  # type: ignore[arg-type]
        if body is None or len(body) > self.max_body:
            response = JSONResponse(error_body(f"request body exceeds {self.max_body} bytes", "invalid_request_error"),
                                    status_code=413)
            return await response(scope, receive, send_with_id)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send_with_id)


def _error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, _KINDS.get(status, "server_error")), status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI, ctx: Context) -> None:
    def count(request: Request, status: int) -> None:
        # refusals before a version was picked (auth, validation, limits) count against the primary;
        # 429s are counted where the queue that refused them is known (handlers.prepare)
        # (only known routes: a label per arbitrary path would let any client grow the metrics without bound)
        endpoint = _ENDPOINTS.get(request.url.path)
        if endpoint is not None and status != 429:
            primary = ctx.router.primary
            ctx.metrics.finished(primary.model_name, primary.version, endpoint, status, 0.0)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        count(request, exc.status_code)
        return _error_response(exc.status_code, str(exc.detail), dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        count(request, 422)
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in exc.errors())
        return _error_response(422, problems or "invalid request")

    @app.exception_handler(GenerationTimeout)
    async def timeout(_request: Request, _exc: GenerationTimeout) -> JSONResponse:
        return _error_response(504, "generation timed out")

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> JSONResponse:
        # never the request body: it may hold personal data
        log.error("request %s failed: %s: %s", request.state.request_id, type(exc).__name__, exc)
        return _error_response(500, "internal error while generating")


def _key_checker(api_keys: list[str]) -> Callable[[Request], None]:
    encoded = [k.encode() for k in api_keys]

    def check_key(request: Request) -> None:
        if not encoded:
            return
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip().encode()
        # compare against every key, always, so timing says nothing about which or how many matched
        matches = [hmac.compare_digest(given, key) for key in encoded]
        if not any(matches):
            raise HTTPException(401, "missing or invalid API key", headers={"WWW-Authenticate": "Bearer"})

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


def create_app(ctx: Context, api_keys: list[str], follower: Any = None) -> FastAPI:
    """The app over a router of loaded slots; `follower` (hot reload) starts and stops with it."""
    state = {"ready": False}

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if follower is not None:
            follower.start()
        state["ready"] = True
        yield
        state["ready"] = False  # draining: load balancers stop sending before the engines stop
        if follower is not None:
            follower.stop()
        for slot in ctx.router.slots():
            slot.engine.stop(drain=True, timeout=ctx.settings.request_timeout_s)

    app = FastAPI(title="lmctl", version="1", lifespan=lifespan)
    app.add_middleware(RequestEnvelope, max_body_bytes=ctx.settings.max_body_bytes)
    _install_error_handlers(app, ctx)
    auth = [Depends(_key_checker(api_keys))]

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        reloads = list(follower.events)[-10:] if follower is not None else []
        return {"status": "ok", **ctx.router.state(), "reloads": reloads}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        primary = ctx.router.primary
        if not state["ready"]:
            return JSONResponse({"status": "not_ready", "why": "starting or draining"}, status_code=503)
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

    async def run(request: Request, body: CompletionRequest | ChatRequest, endpoint: str) -> Response:
        rid = request.state.request_id
        prep = prepare(ctx, body, endpoint, rid, request.headers.get("x-client-id"))
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
