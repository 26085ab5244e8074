"""The output guard: generated text checked for personal data and deny-listed patterns before it leaves.

`--output-guard` picks what a finding does: `flag` counts it (lmctl_output_guard_events_total) and
logs its kind, `redact` replaces it with `[REDACTED_<KIND>]` (`lmctl.pii`'s placeholders), `refuse`
ends the response there with finish_reason `content_filter`, as OpenAI does; `off` skips the check.
Findings come from `lmctl.pii.find_pii`, the detector `lmctl data` uses (called in this one place),
plus the `--output-deny` regular expressions (kind `deny`).

Streams: `redact` and `refuse` must decide before text is sent, and a match may be split across
deltas, so the guard holds back the unsent tail that a match could still grow from: the last
`HOLD_CHARS` characters, at least the whole trailing run of non-space characters (an e-mail
address, a key or a URL is one run however long), and a PEM private key from its BEGIN line until
its END. A finding that crosses the point it would send up to is decided whole. A match longer
than HOLD_CHARS with spaces in it (a deny pattern, a quoted password) may have its start sent
before it is complete; its unsent rest is still redacted, or the response refused, once it is.
Decided text goes out in steps of at least `STEP_CHARS`, and each check scans only the unsent text
and `HOLD_CHARS` before it, so the detector runs once a step, not once a token, and a long
completion costs linear time. `flag` changes nothing, so it holds nothing back and checks the
whole text once, at the end. Hand-written: guardrail libraries (guardrails-ai, NeMo Guardrails,
Presidio's anonymizer) validate whole texts, not a token stream with a bounded hold-back.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from lmctl.pii import find_pii

log = logging.getLogger("lmctl.serve")
HOLD_CHARS = 64  # longer than any spaced finding (a grouped IBAN is at most 42 characters)
STEP_CHARS = 16  # decided text is released in steps of at least this much: one detector call per step
_PEM_END = re.compile(r"-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----")


@dataclass(frozen=True)
class Hit:
    kind: str  # a lmctl.pii kind, or "deny"
    start: int
    end: int


class OutputGuard:
    """The server's guard settings; `stream()` makes the per-response state."""

    def __init__(self, action: str, deny: list[str], events: Any = None) -> None:
        """`events`: the lmctl_output_guard_events counter (labels kind, action, model, version)."""
        self.action = action
        self.deny = [re.compile(p) for p in deny]
        self.counter = events

    def findings(self, text: str, start: int = 0, deny_from: int = 0) -> list[Hit]:
        """PII in `text[start:]` (the one call of lmctl.pii's detector) and deny-list matches from
        `max(start, deny_from)`, in order. Deny patterns scan the whole string from there, so their
        look-behinds see the text before it, and each scan resumes where the last decided match
        ended, as one scan of the whole text would."""
        hits = [Hit(f.kind, f.start + start, f.end + start) for f in find_pii(text[start:])]
        for pattern in self.deny:
            hits += [Hit("deny", m.start(), m.end()) for m in pattern.finditer(text, max(start, deny_from))
                     if m.end() > m.start()]
        return sorted(hits, key=lambda h: (h.start, -h.end))

    def stream(self) -> "GuardedText":
        return GuardedText(self)

    def record(self, guarded: "GuardedText", request_id: str, model: str, version: str) -> None:
        """Count one response's findings and log their kinds (never the text), once it ended."""
        if self.action == "flag" and not guarded.finished:  # a stream cut short is still checked
            guarded.finish()
        if not guarded.events:
            return
        for (kind, action), n in Counter(guarded.events).items():
            if self.counter is not None:
                self.counter.labels(kind, action, model, version).inc(n)
        kinds = ", ".join(sorted({k for k, _ in guarded.events}))
        log.warning("request %s: output guard %s: %s", request_id, guarded.events[0][1], kinds)


class GuardedText:
    """One response's text through the guard: raw deltas in, what may be sent out."""

    def __init__(self, guard: OutputGuard) -> None:
        self.guard = guard
        self.raw = ""
        self.run_start = 0  # where the trailing run of non-space characters starts
        self.sent_to = 0  # raw characters before this are decided (sent, redacted or dropped)
        self.decided_to = 0  # where the last finding acted on ended
        self.refused = False
        self.finished = False
        self.events: list[tuple[str, str]] = []  # (kind, action), each finding once

    def push(self, delta: str) -> str:
        """Add generated text; return what may be sent now."""
        if self.guard.action == "off" or self.refused:
            return delta if not self.refused else ""
        self.raw += delta
        if self.guard.action == "flag":
            return delta
        spaces = [i for i, ch in enumerate(delta) if ch.isspace()]
        if spaces:
            self.run_start = len(self.raw) - len(delta) + spaces[-1] + 1
        cut = self._cut()
        return self._release(cut) if cut - self.sent_to >= STEP_CHARS else ""

    def finish(self, tail: str = "") -> str:
        """The rest, once generation ended: nothing more can extend a match."""
        self.finished = True
        if self.guard.action == "off" or self.refused:
            return tail if not self.refused else ""
        self.raw += tail
        if self.guard.action == "flag":
            self.events += [(h.kind, "flag") for h in self.guard.findings(self.raw)]
            return tail
        return self._release(len(self.raw))

    def _cut(self) -> int:
        """How far the raw text may be decided now: before the tail a match could still grow from."""
        cut = min(len(self.raw) - HOLD_CHARS, self.run_start)
        begin = self.raw.rfind("-----BEGIN", self.sent_to)  # a PEM private key spans lines: hold it to its END
        if begin >= 0 and not _PEM_END.search(self.raw, begin):
            cut = min(cut, begin)
        return max(self.sent_to, cut)

    def _release(self, cut: int) -> str:
        # from a space at least HOLD_CHARS before the unsent text, so no match starts mid-word
        scan_from = self.raw.rfind(" ", 0, max(0, self.sent_to - HOLD_CHARS)) + 1
        hits = [h for h in self.guard.findings(self.raw, scan_from, self.decided_to) if h.end > self.sent_to]
        out, pos = [], self.sent_to
        for hit in hits:
            if hit.start >= cut:
                break
            if hit.end <= pos:  # inside a finding already redacted (a deny pattern over PII, say)
                continue
            self.decided_to = hit.end
            if self.guard.action == "refuse":
                self.refused = True
                self.events.append((hit.kind, "refuse"))
                out.append(self.raw[pos:max(pos, hit.start)])
                self.sent_to = len(self.raw)
                return "".join(out)
            out += [self.raw[pos:max(pos, hit.start)], f"[REDACTED_{hit.kind.upper()}]"]
            self.events.append((hit.kind, "redact"))
            pos = max(pos, hit.end)
            cut = max(cut, pos)  # a finding that crossed the cut is decided whole
        if pos < cut:
            out.append(self.raw[pos:cut])
        self.sent_to = max(pos, cut)
        return "".join(out)
