"""Start and wait for servers that a script or a test runs: a free loopback port to give one
(`free_port`), and waiting until it answers HTTP 200 (`wait_for_http`).

The one loop for everyone who starts `lmctl serve`, `mlflow server` or `transformers serve`
as a child process and must not talk to it before it is up (scripts/demo.py, load_test.py,
bench_serve.py, team_server.py and the tests; pytest finds this folder through `pythonpath`
in pyproject.toml). It polls with a pause between tries and fails loudly: when the process
exits first or the deadline passes it raises, with the tail of the server's log, instead of
carrying on against a server that is not there.

Hand-written on the standard library: no dependency of lmctl waits for a child process to
answer, and team_server.py must run with nothing but the standard library and mlflow.
"""

from __future__ import annotations

import http.client
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

PROBE_TIMEOUT_S = 2.0  # one GET; a server still loading may not answer, then the next try asks again
INTERVAL_S = 0.3  # between tries (a server takes seconds to load a model: no need to ask more often)
LOG_TAIL_CHARS = 3000
# A loopback probe never goes through an http_proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it; a server started
    right after binds it, with the usual small race against other processes)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerNotUp(RuntimeError):
    """The server exited, or did not answer 200 in time; the message ends with its log's tail."""


def wait_for_http(url: str, timeout: float, proc: subprocess.Popen | None = None,  # type: ignore[type-arg]
                  log: Path | None = None) -> None:
    """Return once GET `url` answers 200. Raise ServerNotUp as soon as `proc` (the server's
    process, if given) has exited, or once `timeout` seconds have passed; `log` (the file its
    output goes to, if any) supplies the message's tail."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise ServerNotUp(f"the server for {url} exited with code {proc.returncode}{_tail(log)}")
        failure = _probe(url)
        if failure is None:
            return
        left = deadline - time.monotonic()
        if left <= 0:
            raise ServerNotUp(f"{url} did not answer 200 within {timeout:g} s (last try: {failure}){_tail(log)}")
        _pause(proc, min(INTERVAL_S, left))


def _probe(url: str) -> str | None:
    """None when `url` answers 200, else what happened instead."""
    try:
        with _OPENER.open(url, timeout=PROBE_TIMEOUT_S) as response:
            return None if response.status == 200 else f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out, half-started server
        return f"{type(exc).__name__}: {exc}"


def _pause(proc: subprocess.Popen | None, seconds: float) -> None:  # type: ignore[type-arg]
    """Sleep, but wake as soon as the server's process exits."""
    if proc is None:
        time.sleep(seconds)
        return
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        pass


def _tail(log: Path | None) -> str:
    if log is None:
        return ""
    try:
        text = log.read_text(errors="replace")
    except OSError as exc:
        return f"; its log {log} cannot be read: {exc}"
    return f"; the end of its log {log}:\n{text[-LOG_TAIL_CHARS:]}"
