"""A real uvicorn server in a background thread, for tests that need HTTP and the registry in-process."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx


class LiveServer:
    def __init__(self, app: Any, port: int, wait_ready: bool = True) -> None:
        """`wait_ready`: enter only once /readyz answers 200 (after the warm-up generation)."""
        import uvicorn

        self.wait_ready = wait_ready
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        while self.wait_ready and httpx.get(f"{self.url}/readyz").status_code != 200:
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.02)
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


def diverged_model(base: Path, dest: Path) -> Path:
    """`base` with its final norm's weights NaN: a model whose every generation fails
    (NonFiniteLogitsError), as one whose training diverged."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(base).save_pretrained(dest)
    return dest


def sse_events(response: httpx.Response) -> list[Any]:
    """The data payloads of a server-sent event stream, [DONE] included as a string."""
    events = []
    for line in response.text.splitlines():
        if line.startswith("data: "):
            payload = line.removeprefix("data: ")
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


@contextmanager
def log_records(*names: str) -> Iterator[list[logging.LogRecord]]:
    """Every record the named loggers emit meanwhile. Read from the loggers themselves: uvicorn's
    and (once the CLI set up logging) lmctl's do not propagate to the root, where caplog listens."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append  # type: ignore[method-assign]
    loggers = [logging.getLogger(name) for name in names]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield records
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
