"""Draft tokens for greedy rows by prompt lookup: what followed the last time this n-gram occurred.

Text repeats itself: a completion copies names and phrases from its prompt, and a small model's
greedy continuation loops. When the last 3 (else 2) tokens of a row's context occurred before,
the tokens that followed them are a cheap guess at the next ones. The engine feeds the guess to
the model behind the row's real next token (lmctl.serve.ragged) and keeps the longest prefix the
model's own argmax agrees with, plus the model's token after it: the output is the one greedy
decoding gives, only fewer forwards produce it. On a CPU a decode step at serving batch sizes
costs a fixed ~80 ms (reading the weights) plus a few ms per token, so a verified draft token
costs a fraction of the step it saves. transformers' `generate(prompt_lookup_num_tokens=...)`
does this for one unbatched sequence only; the index here is per job and incremental (a dict
lookup per step instead of a scan of the context).
"""

from __future__ import annotations

NGRAM_SIZES = (3, 2)  # longest first: a longer match is a better guess; single tokens guess badly


class NgramDrafter:
    """The context of one job (prompt + emitted tokens) and, per n-gram size, where each n-gram
    last occurred with at least one token after it."""

    def __init__(self, prompt: list[int]) -> None:
        self.context: list[int] = []
        self._last_seen: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in NGRAM_SIZES}
        self.extend(prompt)

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            self.context.append(token)
            end = len(self.context) - 1  # the n-gram ending just before `token` is now followed by it
            for n, seen in self._last_seen.items():
                if end >= n:
                    seen[tuple(self.context[end - n:end])] = end - n

    def propose(self, limit: int) -> list[int]:
        """`limit` tokens (or none) that followed the most recent earlier occurrence of the context's tail."""
        if limit <= 0:
            return []
        for n, seen in self._last_seen.items():
            if len(self.context) <= n:
                continue
            start = seen.get(tuple(self.context[-n:]))
            if start is None:
                continue
            # Copy what followed, LZ77-style: a copy that runs into the tail continues from its own
            # start, so a loop of period p yields `limit` tokens, not only the p the context holds.
            draft: list[int] = []
            for j in range(start + n, start + n + limit):
                draft.append(self.context[j] if j < len(self.context) else draft[j - len(self.context)])
            return draft
        return []
