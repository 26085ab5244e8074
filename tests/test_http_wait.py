"""scripts/http_wait.py against real HTTP servers on loopback: one that answers 503 until it
is ready (polled with pauses, not spun), one that is never ready and a port nobody listens on
(the deadline is a clear error), and a server process that exits before it is up."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import free_port
from http_wait import ServerNotUp, wait_for_http


class _Warming(ThreadingHTTPServer):
    """Answers 503 until `ready_at` (time.monotonic), then 200; counts the requests."""

    ready_at = float("inf")
    requests = 0


class _Handler(BaseHTTPRequestHandler):
    server: _Warming

    def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
        self.server.requests += 1
        self.send_response(200 if time.monotonic() >= self.server.ready_at else 503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:  # keep the test output quiet
        pass


@pytest.fixture
def warming() -> Iterator[_Warming]:
    server = _Warming(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _url(server: _Warming) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/readyz"


def test_returns_once_the_server_answers_200_polling_with_pauses(warming: _Warming) -> None:
    warming.ready_at = time.monotonic() + 1.5
    started = time.monotonic()
    wait_for_http(_url(warming), timeout=30)
    assert 1.5 <= time.monotonic() - started < 5
    assert 2 <= warming.requests <= 10  # a pause between tries (a spinning loop asks hundreds of times)


def test_a_server_never_ready_fails_at_the_deadline_with_its_log(warming: _Warming, tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    log.write_text("loading model...\nstill loading\n")
    started = time.monotonic()
    with pytest.raises(ServerNotUp, match=r"did not answer 200 within 1 s \(last try: HTTP 503\)") as caught:
        wait_for_http(_url(warming), timeout=1, log=log)
    assert 1 <= time.monotonic() - started < 4
    assert str(caught.value).endswith("loading model...\nstill loading\n")


def test_nothing_listening_fails_at_the_deadline() -> None:
    with pytest.raises(ServerNotUp, match=r"did not answer 200 within 1 s \(last try: URLError: .*refused"):
        wait_for_http(f"http://127.0.0.1:{free_port()}/healthz", timeout=1)


def test_a_server_that_exits_fails_at_once_with_its_code_and_log(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    script = "import sys, time; time.sleep(0.5); print('address already in use'); sys.exit(3)"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=out, stderr=subprocess.STDOUT)
    started = time.monotonic()
    with pytest.raises(ServerNotUp, match="exited with code 3") as caught:
        wait_for_http(f"http://127.0.0.1:{free_port()}/healthz", timeout=60, proc=proc, log=log)
    assert time.monotonic() - started < 10  # not the 60 s deadline
    assert "address already in use" in str(caught.value)
