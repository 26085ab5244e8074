"""Redact text that arrives in chunks (a streamed completion), without a finding ever split.

The one stream hold-back in lmctl: `lmctl serve`'s output guard (lmctl.serve.guard) runs on it.

`StreamRedactor(detector).feed(chunk)` returns the text that is safe to pass on now, already
redacted; `.flush()` returns the rest at the end of the stream; `.findings` holds what was
redacted (offsets in the whole stream). With `stop=True` nothing is rewritten: at the first
finding it passes on the text before it, sets `.stopped` and passes on nothing more (the guard's
`refuse`); `.findings` then holds that one finding.

What is held back, since a finding near the end could still grow ("alice@example.c" + "om"):
- the last `holdback` characters (the default 256 covers phones, emails, cards, IBANs, IPs and
  API keys; the guard uses 64, longer than any finding with a space in it: a grouped IBAN is at
  most 42 characters);
- the whole trailing run of non-space characters, however long (an e-mail address, a key or a
  URL is one run): a cut never falls inside a word, since the detectors look at a match's
  neighbours (a stream with no whitespace at all is held to the flush);
- an open "-----BEGIN ..." block, from that line until an "-----END ...-----" line;
- and a cut never falls inside a finding.
So the text passed on is the text `Detector.redact` gives for the whole stream, as long as no
finding with a space in it is longer than `holdback`. One that is (a long deny pattern) may have
its start passed on before it matches; its rest is still redacted (or the stream stopped) once
it does.

Each scan also sees up to `context` characters already passed on (64, from a word's start, so
no fragment of a number is a new phone candidate at each scan), so a value after "Bearer " or
"password=" in an earlier chunk is still found; deny patterns resume their scan where the last
finding passed on ended, as one scan of the whole text would.

Cost: the detector runs at most once per `step` characters fed (and only once at least `step`
characters can be passed on), over the context, the held-back text and the new text: each
character is scanned about (context + holdback + step) / step times (lmctl.pii.phones caches
phonenumbers' verdicts, so a number is parsed once however many scans see it). A client sees
output `holdback` to `holdback + step` characters late (plus the trailing word), and all of it at
`flush()`.

Hand-written: guardrail and anonymizer libraries (Presidio's anonymizer, guardrails-ai, NeMo
Guardrails) check whole texts, not a chunk stream with a bounded hold-back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from lmctl.pii import DEFAULT, Detector, Finding, substitute

_LAST_SPACE = re.compile(r"\s(?=\S*\Z)")
_FIRST_SPACE = re.compile(r"\s")
_BLOCK_END = re.compile(r"-----END [A-Z0-9 ]*-----")


@dataclass
class StreamRedactor:
    detector: Detector = DEFAULT
    holdback: int = 256
    step: int = 64
    findings: list[Finding] = field(default_factory=list)
    context: int = 64
    stop: bool = False  # report the first finding and stop there instead of rewriting
    stopped: bool = False  # a finding stopped the stream (stop=True): nothing more is passed on
    _buf: str = ""
    _before: str = ""  # the raw text just before _buf, already passed on: what look-behinds see
    _offset: int = 0  # stream offset of _buf[0]
    _run: int = 0  # where the trailing run of non-space characters starts in _buf
    _resume: int = 0  # stream offset where the last finding passed on ended: the deny scan resumes there
    _unscanned: int = 0  # characters fed since the last scan

    def feed(self, chunk: str) -> str:
        """The redacted text that can be passed on now (often "")."""
        if self.stopped:
            return ""
        space = _LAST_SPACE.search(chunk)
        if space:
            self._run = len(self._buf) + space.end()
        self._buf += chunk
        self._unscanned += len(chunk)
        if self._unscanned < self.step or len(self._buf) < self.holdback + self.step:
            return ""
        bound = self._bound()
        return self._emit(bound) if bound >= self.step else ""

    def flush(self) -> str:
        """Everything still held back, redacted: call once at the end of the stream."""
        return "" if self.stopped else self._emit(len(self._buf))

    def _bound(self) -> int:
        """How far the text may be passed on before the detector is asked: the cheap rules."""
        buf = self._buf
        cut = min(len(buf) - self.holdback, self._run)
        begin = buf.rfind("-----BEGIN")
        if begin >= 0 and not _BLOCK_END.search(buf, begin):
            cut = min(cut, begin)
        return _word_start(buf, cut)

    def _cut(self, found: list[Finding], cut: int) -> int:
        moved = True
        while moved:  # each move goes left, so this ends
            moved = False
            for f in found:  # never inside a finding
                if f.start < cut < f.end:
                    cut, moved = max(0, f.start), True
            if moved:
                cut = _word_start(self._buf, cut)
        return cut

    def _emit(self, bound: int) -> str:
        self._unscanned = 0
        n, window_offset = len(self._before), self._offset - len(self._before)
        # Scan with the text before the buffer, so "Bearer " or "password=" passed on in an earlier
        # piece still marks the value in this one. Findings that end there are done; one that only
        # ends here (it grew past what was passed on) still has its rest replaced.
        scan = self.detector.find(self._before + self._buf, max(0, self._resume - window_offset))
        found = [Finding(f.kind, f.start - n, f.end - n, f.text) for f in scan if f.end > n]
        cut = self._cut(found, bound)
        done = [f for f in found if f.end <= cut]
        if self.stop and done:  # the text before the first finding, then nothing more
            first = done[0]
            self.findings.append(Finding(first.kind, first.start + self._offset, first.end + self._offset, first.text))
            self.stopped = True
            return self._pass_on(self._buf[: max(0, first.start)], len(self._buf))
        self.findings += [Finding(f.kind, f.start + self._offset, f.end + self._offset, f.text) for f in done]
        if done:
            self._resume = done[-1].end + self._offset
        return self._pass_on(substitute(self._buf[:cut], done), cut)

    def _pass_on(self, out: str, cut: int) -> str:
        # From a word's start: a fragment ("946 0958") would be a new candidate at every scan.
        before = (self._before + self._buf[:cut])[-self.context :]
        space = _FIRST_SPACE.search(before)
        self._before = before[space.start():] if space else ""
        self._buf, self._offset, self._run = self._buf[cut:], self._offset + cut, max(0, self._run - cut)
        return out


def _word_start(buf: str, cut: int) -> int:
    """`cut`, or the start of the word it falls inside (0 when the word starts before `buf`)."""
    if cut <= 0 or cut >= len(buf) or buf[cut - 1].isspace() or buf[cut].isspace():
        return max(0, cut)
    space = _LAST_SPACE.search(buf, 0, cut)
    return space.end() if space else 0
