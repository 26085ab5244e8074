"""Find and redact personal data and credentials in free text.

API (everything a caller needs; `lmctl data prepare|validate` and `lmctl serve` use it):
- `Detector(kinds=KINDS, regions=DEFAULT_REGIONS, deny=())`: `.find(text) -> list[Finding]`
  (kind, start, end, text; sorted; non-overlapping but for deny matches) and `.redact(text) -> (text, findings)`,
  which puts "[REDACTED_<KIND>]" in place of each finding. `deny`: regular expressions whose
  matches are findings of kind "deny" (the serve output guard's --output-deny). Unknown kinds or
  regions, or a pattern that does not compile: BadInputError.
- `find_pii(text)` / `redact(text)`: the same with the default detector.
- `StreamRedactor(detector)` (lmctl.pii.stream): redacts text that arrives in chunks, or stops
  at the first finding; the one stream hold-back in lmctl (the serve output guard runs on it).

Which kind comes from where:
- phone: the `phonenumbers` library (libphonenumber, as Presidio uses) over configurable
  regions, with lmctl's shape filter on top (lmctl.pii.phones says which and why);
- email, card (Luhn), iban (mod-97), ip (stdlib `ipaddress`), secret (AWS, GitHub, Slack,
  Google, Stripe, OpenAI keys, JWTs, PEM private keys, Bearer tokens, `password=` values):
  lmctl's own rules (lmctl.pii.rules), because no library does better than a shape plus the
  real check for these.

All kinds run independently and overlaps are settled once, at the end: the longer finding wins
(it explains more of the text), ties go to the earlier kind in KINDS. A deny match is never
settled away: it is redacted whole, so where it overlaps another finding both are kept (each
redacted from where the one before it ended), and only a finding inside an earlier one is dropped.

Cost (scripts/bench_pii.py, one process on a loaded 2-core machine, default regions): 1-2 ms
per KB of prose and 2.5-10 ms per KB of digit-dense text (each run of >= 7 digits is parsed by
phonenumbers per region), 18-29x less than Presidio's analyzer in the same runs; StreamRedactor:
docs/pii.md#streams.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial

import phonenumbers

from lmctl.errors import BadInputError
from lmctl.pii.phones import DEFAULT_REGIONS, check_regions, phone_spans
from lmctl.pii.rules import RULES, Span

KINDS: tuple[str, ...] = ("email", "phone", "card", "ip", "iban", "secret")

__all__ = ["DEFAULT_REGIONS", "KINDS", "Detector", "Finding", "find_pii", "redact"]


@dataclass(frozen=True)
class Finding:
    kind: str  # one of KINDS, or "deny" (a Detector's deny pattern)
    start: int  # char offset in the text
    end: int  # exclusive
    text: str  # the matched substring


@dataclass(frozen=True)
class Detector:
    """Which kinds to look for and in which regions' national formats phone numbers are read."""

    kinds: tuple[str, ...] = KINDS
    regions: tuple[str, ...] = DEFAULT_REGIONS
    deny: tuple[str, ...] = ()  # regular expressions (Python syntax): their matches are findings of kind "deny"
    _rules: dict[str, Callable[[str], Iterator[Span]]] = field(init=False, repr=False, compare=False)
    _deny: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "deny", tuple(self.deny))
        object.__setattr__(self, "_deny", tuple(_compile(p) for p in self.deny))
        object.__setattr__(self, "kinds", tuple(self.kinds))
        unknown = sorted(set(self.kinds) - set(KINDS))
        if unknown:
            raise BadInputError(f"unknown PII kind(s) {', '.join(unknown)}: choose from {', '.join(KINDS)}")
        regions = check_regions(tuple(self.regions))
        object.__setattr__(self, "regions", regions)
        rules = {**RULES, "phone": partial(phone_spans, regions=regions)}
        object.__setattr__(self, "_rules", {k: rules[k] for k in KINDS if k in self.kinds})

    def find(self, text: str, start: int = 0) -> list[Finding]:
        """All findings, sorted by start, non-overlapping (on overlap keep the longer; on ties the earlier
        kind in KINDS) except where a deny match overlaps another (module docstring). Only findings from
        `start` on: the text before it is context (what look-behinds see); the deny scan begins there."""
        candidates = {(s, e, kind) for kind, rule in self._rules.items() for s, e in rule(text) if s >= start}
        found = [Finding(kind, s, e, text[s:e]) for s, e, kind in _settle(candidates)]
        if not self._deny:
            return found
        found += [Finding("deny", m.start(), m.end(), m.group()) for pattern in self._deny
                  for m in pattern.finditer(text, start) if m.end() > m.start()]
        return _uncovered(sorted(found, key=lambda f: (f.start, -f.end)))

    def redact(self, text: str) -> tuple[str, list[Finding]]:
        """Replace each finding with "[REDACTED_<KIND>]" (e.g. [REDACTED_EMAIL]); return new text and findings."""
        findings = self.find(text)
        return substitute(text, findings), findings


def _settle(candidates: Iterable[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    # Greedy by priority: longest first, then KINDS order, then leftmost for determinism. Kept
    # spans never overlap, so they stay sorted and a new one only has to be checked against its
    # two neighbours (bisect), which keeps logs with thousands of findings fast.
    ranked = sorted(candidates, key=lambda c: (-(c[1] - c[0]), KINDS.index(c[2]), c[0]))
    kept: list[tuple[int, int, str]] = []
    for cand in ranked:
        i = bisect.bisect_left(kept, cand)
        if (i == 0 or kept[i - 1][1] <= cand[0]) and (i == len(kept) or cand[1] <= kept[i][0]):
            kept.insert(i, cand)
    return kept


def _compile(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise BadInputError(f"deny pattern {pattern!r} is not a regular expression: {exc}") from None


def _uncovered(findings: list[Finding]) -> list[Finding]:
    """Sorted findings less those inside an earlier one (a phone inside a deny-listed phrase, say)."""
    kept: list[Finding] = []
    for f in findings:
        if not kept or f.end > kept[-1].end:
            kept.append(f)
    return kept


def substitute(text: str, findings: list[Finding]) -> str:
    """`text` with each finding (sorted, as `find` gives them) replaced by its placeholder. Where findings
    overlap (a deny match), each is replaced from where the one before it ended, so no part of either
    is left; a finding may start before `text` (offset < 0): only its part in `text` is replaced."""
    out: list[str] = []
    pos = 0
    for f in findings:
        out += [text[pos : max(pos, f.start)], f"[REDACTED_{f.kind.upper()}]"]
        pos = max(pos, f.end)
    return "".join(out + [text[pos:]])


DEFAULT = Detector()
# What the default detector is: caches of findings (lmctl.data.cache) key on it. Bump the rules
# number when a rule changes; the phonenumbers version carries its metadata's.
SIGNATURE = f"rules 2, phonenumbers {phonenumbers.__version__}, regions {','.join(DEFAULT.regions)}"


def find_pii(text: str) -> list[Finding]:
    """`Detector().find(text)`: every kind, default phone regions."""
    return DEFAULT.find(text)


def redact(text: str) -> tuple[str, list[Finding]]:
    """`Detector().redact(text)`: every kind, default phone regions."""
    return DEFAULT.redact(text)
