"""The output guard: generated text checked for personal data and deny-listed patterns before it leaves.

`--output-guard` picks what a finding does: `flag` counts it (lmctl_output_guard_events_total) and
logs its kind, `redact` replaces it with `[REDACTED_<KIND>]` (`lmctl.pii`'s placeholders), `refuse`
ends the response there with finish_reason `content_filter`, as OpenAI does; `off` skips the check.
Findings come from `lmctl.pii`'s `Detector`, the one `lmctl data` and the serve sample log use (the
default kinds and regions), given the `--output-deny` regular expressions (kind `deny`).

Streams: `redact` and `refuse` must decide before text is sent, and a match may be split across
deltas, so each response's text goes through `lmctl.pii.stream.StreamRedactor`, lmctl's one stream
hold-back (its docstring says what it holds and why), with HOLD_CHARS held back and text passed on
in steps of STEP_CHARS; `refuse` runs it with `stop=True`. `flag` changes nothing, so it holds
nothing back and checks the whole text once, at the end.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import replace
from typing import Any

from lmctl.pii import DEFAULT
from lmctl.pii.stream import StreamRedactor

log = logging.getLogger("lmctl.serve")
HOLD_CHARS = 64  # longer than any finding with a space in it (a grouped IBAN is at most 42 characters)
STEP_CHARS = 16  # decided text is passed on in steps of at least this much: one detector call per step


class OutputGuard:
    """The server's guard settings; `stream()` makes the per-response state."""

    def __init__(self, action: str, deny: list[str], events: Any = None) -> None:
        """`events`: the lmctl_output_guard_events counter (labels kind, action, model, version)."""
        self.action = action
        self.detector = replace(DEFAULT, deny=tuple(deny))  # the sample log's and `lmctl data`'s, plus deny
        self.counter = events

    def stream(self) -> "GuardedText":
        return GuardedText(self)

    def record(self, guarded: "GuardedText", request_id: str, model: str, version: str) -> None:
        """Count one response's findings and log their kinds (never the text), once it ended."""
        if self.action == "flag" and not guarded.finished:  # a stream cut short is still checked
            guarded.finish()
        events = guarded.events
        if not events:
            return
        for (kind, action), n in Counter(events).items():
            if self.counter is not None:
                self.counter.labels(kind, action, model, version).inc(n)
        kinds = ", ".join(sorted({k for k, _ in events}))
        log.warning("request %s: output guard %s: %s", request_id, events[0][1], kinds)


class GuardedText:
    """One response's text through the guard: raw deltas in, what may be sent out."""

    def __init__(self, guard: OutputGuard) -> None:
        self.guard = guard
        self.finished = False
        self._flagged: list[str] = []  # flag: the raw text, checked once at the end
        self._kinds: list[str] = []  # flag: the kinds found
        self._redactor = (StreamRedactor(guard.detector, holdback=HOLD_CHARS, step=STEP_CHARS, context=HOLD_CHARS,
                                         stop=guard.action == "refuse")
                          if guard.action in ("redact", "refuse") else None)

    @property
    def refused(self) -> bool:
        return self._redactor is not None and self._redactor.stopped

    @property
    def events(self) -> list[tuple[str, str]]:
        """(kind, action) for each finding acted on."""
        if self._redactor is None:
            return [(kind, "flag") for kind in self._kinds]
        return [(f.kind, self.guard.action) for f in self._redactor.findings]

    def push(self, delta: str) -> str:
        """Add generated text; return what may be sent now."""
        if self._redactor is not None:
            return self._redactor.feed(delta)
        if self.guard.action == "flag":
            self._flagged.append(delta)
        return delta

    def finish(self, tail: str = "") -> str:
        """The rest, once generation ended: nothing more can extend a match."""
        self.finished = True
        if self._redactor is not None:
            return self._redactor.feed(tail) + self._redactor.flush()
        if self.guard.action == "flag":
            self._kinds = [f.kind for f in self.guard.detector.find("".join(self._flagged) + tail)]
        return tail
