"""The body rule of the JSON routes: a UTF-8 JSON text, sent as `Content-Type: application/json`.

FastAPI parses a body as JSON only when its Content-Type says JSON; any other body (curl's
`-d` sends a form type; none at all) reached validation as bytes, and the client read a 422
"Input should be a valid dictionary" that says nothing of the cause. It also parses with
`json.loads(bytes)`, which guesses UTF-16 and UTF-32 from the bytes, so a UTF-16 body passed.
This route class (FastAPI's documented extension point for custom request handling) checks
the body before FastAPI parses it:

- a Content-Type other than application/json (or `+json`) is a 415 that says which to send.
  The body is not parsed anyway: `lmctl serve` on a loopback address may run without API
  keys, and a web page in the user's browser can POST `text/plain`, a form type or no type
  without a CORS preflight, so taking those as JSON would let any page make the server
  generate (FastAPI's strict content type guards the same forgery). OpenAI's API needs a
  key in a header, which no page can add without a preflight, so it is no guide here;
- a body that is not UTF-8 (RFC 8259 section 8.1) is a 400;
- a body that is not JSON (NaN and Infinity are not JSON, though Python reads them) is a
  400, as OpenAI answers a body it cannot parse ("We could not parse the JSON body").
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn

from fastapi import HTTPException, Request, Response
from fastapi.routing import APIRoute


def _not_json(constant: str) -> NoReturn:
    raise ValueError(f"{constant} is not a JSON value")


def check_json_body(content_type: str | None, body: bytes) -> None:
    """Raise HTTPException (415 or 400) unless `body` is UTF-8 JSON sent as JSON."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        raise HTTPException(415, f"send the request body as JSON with Content-Type: application/json "
                                 f"(got {repr(media) if media else 'no Content-Type'})")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HTTPException(400, f"the request body is not UTF-8 (byte {exc.start} is "
                                 f"{body[exc.start:exc.start + 1]!r}); send JSON as UTF-8") from None
    try:
        json.loads(text, parse_constant=_not_json)
    except ValueError as exc:  # json.JSONDecodeError is one
        raise HTTPException(400, f"the request body is not valid JSON: {exc}") from None


class JsonBodyRoute(APIRoute):
    """An APIRoute whose handler checks a route's JSON body (check_json_body) before FastAPI parses it."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def checked(request: Request) -> Response:
            check_json_body(request.headers.get("content-type"), await request.body())
            return await handler(request)

        return checked
