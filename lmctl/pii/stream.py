"""Redact text that arrives in chunks (a streamed completion), without a finding ever split.

`StreamRedactor(detector).feed(chunk)` returns the text that is safe to pass on now, already
redacted; `.flush()` returns the rest at the end of the stream; `.findings` holds what was
redacted (offsets in the whole stream). The last `holdback` characters are kept back, since a
finding near the end could still grow ("alice@example.c" + "om"), and a cut never falls inside
a finding or a word: the text passed on is the text `Detector.redact` gives for the whole
stream, as long as no finding is longer than `holdback` (the default 256 covers phones, emails,
cards, IBANs, IPs and API keys; an unterminated "-----BEGIN ... PRIVATE KEY-----" block is held
back whole until its END line or the flush).

Each scan also sees the last `context` characters already passed on (64), so a value after
"Bearer " or "password=" in an earlier chunk is still found.

Cost: the kept-back tail and the context are scanned again with each emission, so each character
is scanned about (context + holdback + step) / step times: with the defaults about 6x
`Detector.find`'s cost per KB. Text is passed on once `step` characters beyond the holdback have arrived, so a client
sees output `holdback` to `holdback + step` characters late, and all of it at `flush()`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from lmctl.pii import DEFAULT, Detector, Finding, substitute

_LAST_SPACE = re.compile(r"\s(?=\S*$)")


@dataclass
class StreamRedactor:
    detector: Detector = DEFAULT
    holdback: int = 256
    step: int = 64
    findings: list[Finding] = field(default_factory=list)
    context: int = 64
    _buf: str = ""
    _before: str = ""  # the raw text just before _buf, already passed on: what look-behinds see
    _offset: int = 0  # stream offset of _buf[0]

    def feed(self, chunk: str) -> str:
        """The redacted text that can be passed on now (often "")."""
        self._buf += chunk
        if len(self._buf) < self.holdback + self.step:
            return ""
        return self._emit(final=False)

    def flush(self) -> str:
        """Everything still held back, redacted: call once at the end of the stream."""
        return self._emit(final=True)

    def _cut(self, found: list[Finding], final: bool) -> int:
        buf = self._buf
        cut = len(buf) if final else len(buf) - self.holdback
        begin = buf.rfind("-----BEGIN")
        if begin >= 0 and "-----END" not in buf[begin:]:
            cut = min(cut, begin)
        moved = True
        while moved:  # each move goes left, so this ends
            moved = False
            for f in found:  # never inside a finding
                if f.start < cut < f.end:
                    cut, moved = f.start, True
            # Never inside a word either: the detectors look at a match's neighbours. A stream
            # with no whitespace at all is cut where it must be.
            if 0 < cut < len(buf) and not buf[cut - 1].isspace() and not buf[cut].isspace():
                space = _LAST_SPACE.search(buf, 0, cut)
                if space:
                    cut, moved = space.end(), True
        return cut

    def _emit(self, final: bool) -> str:
        n = len(self._before)
        # Scan with the text before the buffer, so "Bearer " or "password=" passed on in an
        # earlier piece still marks the value in this one; findings that start there are done.
        found = [Finding(f.kind, f.start - n, f.end - n, f.text) for f in self.detector.find(self._before + self._buf)
                 if f.start >= n]
        cut = self._cut(found, final)
        done = [f for f in found if f.end <= cut]
        self.findings += [Finding(f.kind, f.start + self._offset, f.end + self._offset, f.text) for f in done]
        out = substitute(self._buf[:cut], done)
        self._before = (self._before + self._buf[:cut])[-self.context :]
        self._buf, self._offset = self._buf[cut:], self._offset + cut
        return out
