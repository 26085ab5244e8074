"""The privacy-safe request sample: a JSONL log that `lmctl drift --current` reads.

Every text field goes through `lmctl.pii.redact`, the same redactor as `lmctl data prepare`,
before it is formatted; the raw prompt exists only in memory. Rows are appended whole under a
lock with one write() each, so a crash can at worst lose the last line, never interleave two.
"""

from __future__ import annotations

import json
import random
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from lmctl.clock import utc_now
from lmctl.errors import BadInputError
from lmctl.pii import redact

SCHEMA = "lmctl.sample/1"


class SampleLog:
    def __init__(self, path: Path, rate: float, seed: int | None = None) -> None:
        self.path = path
        self.rate = rate
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.open("a", encoding="utf-8").close()  # fail at start-up, not on the first sampled request
        except OSError as exc:
            raise BadInputError(f"cannot write the sample log {path}: {exc.strerror}") from None

    def wants(self) -> bool:
        with self._lock:
            return self.rate > 0 and self._random.random() < self.rate

    def write(self, *, request_id: str, model: str, version: str, endpoint: str, prompt: str,
              messages: list[dict[str, str]] | None, completion: str, prompt_tokens: int,
              completion_tokens: int, status: int, latency_ms: float) -> None:
        kinds: Counter[str] = Counter()

        def clean(text: str) -> str:
            redacted, findings = redact(text)
            kinds.update(f.kind for f in findings)
            return redacted

        row: dict[str, Any] = {
            "schema": SCHEMA, "ts": utc_now("milliseconds"),
            "request_id": request_id, "model": model, "version": version, "endpoint": endpoint,
            "prompt": clean(prompt),
            "messages": [{"role": m["role"], "content": clean(m["content"])} for m in messages] if messages else None,
            "completion": clean(completion), "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens, "status": status, "latency_ms": round(latency_ms, 3),
        }
        row["pii_redacted"] = dict(kinds)
        line = json.dumps(row, ensure_ascii=False) + "\n"
        with self._lock, self.path.open("a", encoding="utf-8") as fh:
            fh.write(line)
