"""Token ids in, text deltas out: incremental detokenization with stop strings.

Decoding token by token is wrong for byte-level BPE (one character may span tokens, and
leading spaces depend on the neighbours), so the whole completion is re-decoded and only
the new suffix is emitted. A suffix ending in U+FFFD is an incomplete UTF-8 sequence and is
held back; so is a tail that could still grow into a stop string, which must never be sent.
"""

from __future__ import annotations

from typing import Any


class TextStream:
    def __init__(self, tokenizer: Any, stops: list[str] | None) -> None:
        self.tokenizer = tokenizer
        self.stops = stops or []
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False

    def _decoded(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text that is now safe to send (may be empty)."""
        self.ids.append(token_id)
        text = self._decoded()
        for stop in self.stops:
            at = text.find(stop)
            if at >= 0:
                self.stopped = True
                text = text[:at]
        if self.stopped:
            return self._advance(text)
        if text.endswith("\ufffd"):
            return ""
        return self._advance(text[: len(text) - self._held_back(text)])

    def finish(self) -> str:
        """The rest of the text once generation ended (nothing more can complete a stop string)."""
        return "" if self.stopped else self._advance(self._decoded().rstrip("\ufffd"))

    def _held_back(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        longest = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:k]):
                    longest = max(longest, k)
                    break
        return longest

    def _advance(self, text: str) -> str:
        if not text.startswith(self.sent):  # re-decoding changed earlier text (rare): send nothing new
            return ""
        delta = text[len(self.sent):]
        self.sent = text
        return delta

    @property
    def text(self) -> str:
        return self.sent
