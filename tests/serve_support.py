"""A real uvicorn server in a background thread, for tests that need HTTP and the registry in-process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from conftest import ASSETS


class LiveServer:
    def __init__(self, app: Any, port: int) -> None:
        import uvicorn

        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


def train_checkpoint(base: Path, out: Path, steps: int = 6) -> Path:
    """Train the tiny model in a child process with its own LMCTL_HOME; return the checkpoint."""
    cfg = {
        "model": {"base": str(base)},
        "data": {"train": str(ASSETS / "tiny_train.jsonl"), "max_length": 64},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"max_steps": steps, "batch_size": 4, "lr": 5e-3, "save_every": steps, "eval_every": steps},
        "output": {"dir": str(out / "runs"), "run_name": "served"},
    }
    (out / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "LMCTL_HOME": str(out / "home")}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run([sys.executable, "-m", "lmctl", "train", str(out / "cfg.yaml"), "--json"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    return Path(json.loads(done.stdout)["checkpoint"])


def sse_events(response: httpx.Response) -> list[Any]:
    """The data payloads of a server-sent event stream, [DONE] included as a string."""
    events = []
    for line in response.text.splitlines():
        if line.startswith("data: "):
            payload = line.removeprefix("data: ")
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events
