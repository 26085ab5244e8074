"""Find and redact personal data and credentials in free text (stdlib only).

Design:
- Each kind is a regular expression that proposes *candidates* plus, where the shape alone is
  ambiguous, a validator with the real rule (Luhn for cards, ISO 13616 mod-97 for IBANs, octet
  ranges and group counts for IPs). Regexes are cheap at recall; validators buy the precision.
- Every pattern is anchored by explicit look-arounds instead of ``\\b``, because the common
  false positives are *fragments* of larger tokens: an IP inside the version ``1.2.3.4.5``, a
  card inside a UUID, ``sk-`` inside ``task-based``.
- Repetitions always have a mandatory separator between groups, so no pattern can backtrack
  exponentially on long runs of digits, hex or colons.
- All kinds run independently and overlaps are settled once, at the end: the longer finding
  wins (it explains more of the text), ties go to the earlier kind in KINDS.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

KINDS: tuple[str, ...] = ("email", "phone", "card", "ip", "iban", "secret")


@dataclass(frozen=True)
class Finding:
    kind: str  # one of KINDS
    start: int  # char offset in the text
    end: int  # exclusive
    text: str  # the matched substring


Span = tuple[int, int]

# --- email -------------------------------------------------------------------------------------
_EMAIL = re.compile(
    r"(?<![\w.%+/-])[A-Za-z0-9](?:[A-Za-z0-9._%+'-]{0,62}[A-Za-z0-9_%+-])?"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}"
    r"(?![A-Za-z0-9-]|\.[A-Za-z0-9])"
)
# "'" is allowed inside the local part (o'brien@) but not at its ends, so 'a@b.com' stays clean.
# Retina assets (icon@2x.png) have exactly the local@domain.tld shape.
_RETINA = re.compile(r"@\d+x\.", re.IGNORECASE)
# After "scheme://" an "x@host" is URL userinfo (https://token@host, db://user:pw@host), not a mailbox.
_URL_USERINFO = re.compile(r"://[^\s/@]*$")

# --- phone -------------------------------------------------------------------------------------
# International numbers need the "+" (bare digit groups look like dates, ranges, part numbers),
# then an area group of <= 5 digits, maybe in parentheses ("+44 (0)20"), so "+3.14159265" is no
# phone; then " .-"-separated groups. `(?<=\d\d)`: the last group has >= 2 digits, so a count in
# prose ("... 0958 2 times") is not swallowed. Compact E.164 (+14155550123) is allowed too.
_PHONE_INTL = re.compile(
    r"(?<![\w+])\+\d{1,3}"
    r"(?:(?:[ .-]?\(\d{1,4}\)[ .-]?|[ .-])\d{1,5}(?:[ .-]\d{1,8})*|\d{6,12})"
    r"(?<=\d\d)(?!\w|[.-]\w)"
)
# North-American: 3-3-4 with one consistent separator, or "(555) 123-4567".
_PHONE_NANP = re.compile(r"(?<![\w.+-])(?:1[ .-])?(?:\(\d{3}\) ?\d{3}[ .-]\d{4}|\d{3}([ .-])\d{3}\1\d{4})(?!\w|[.-]\w)")

# --- card --------------------------------------------------------------------------------------
# Contiguous 13-19 digits, or the printed groupings 4-4-4-4(-3), 4-6-5 (Amex), 4-6-4 (Diners).
_CARD = re.compile(r"(?<![\w-])(?:\d{13,19}|\d{4}([ -])(?:\d{4}\1\d{4}\1\d{4}(?:\1\d{3})?|\d{6}\1\d{4,5}))(?![\w-])")

# --- ip ----------------------------------------------------------------------------------------
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w]|\.\d)")
# A dotted quad right after these words is a version or section number, not an address.
_VERSION_CONTEXT = re.compile(r"(?<![A-Za-z])(?:version|ver\.?|release|build|section|chapter|§)[\s:=]*$", re.IGNORECASE)
# Candidate: hex groups joined by ':' (one may be empty for '::'), optionally ending in an
# embedded IPv4. It may not end in a lone ':' and may be followed by one (log lines such as
# "2001:db8::1: timeout"), but not by another group. _valid_ipv6 checks the structure.
_IPV6 = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{1,4}|(?=:))(?::[0-9A-Fa-f]{0,4}){2,7}"
    rf"(?:(?<=:){_OCTET}(?:\.{_OCTET}){{3}})?(?:(?<=[0-9A-Fa-f])|(?<=::))(?![\w]|:[\w:]|\.\d)"
)

# --- iban --------------------------------------------------------------------------------------
# Contiguous, or grouped in 4s with single spaces (the printed form).
_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?:[A-Z0-9]{11,30}|(?: [A-Z0-9]{4}){2,7}(?: [A-Z0-9]{1,4})?)(?![A-Za-z0-9])")
# Countries that issue IBANs: a random "XY12..." code then needs the 1-in-97 checksum *and* a
# real country, which keeps part numbers and serials out.
_IBAN_COUNTRIES = frozenset(
    "AD AE AL AT AZ BA BE BG BH BI BR BY CH CR CY CZ DE DJ DK DO EE EG ES FI FK FO FR GB GE GI GL"
    " GR GT HR HU IE IL IQ IS IT JO KW KZ LB LC LI LT LU LV LY MC MD ME MK MN MR MT MU NI NL NO OM"
    " PK PL PS PT QA RO RS RU SA SC SD SE SI SK SM SO ST SV TL TN TR UA VA VG XK".split()
)

# --- secret ------------------------------------------------------------------------------------
_URLSAFE = r"[A-Za-z0-9_-]"
_SECRET_SHAPES = [
    re.compile(r"(?<![A-Za-z0-9])(?:AKIA|ASIA)[0-9A-Z]{16}(?![A-Za-z0-9])"),
    re.compile(r"(?<![A-Za-z0-9_])gh[pousr]_[A-Za-z0-9]{36}(?![A-Za-z0-9_])"),
    re.compile(r"(?<![A-Za-z0-9_])github_pat_[A-Za-z0-9_]{22,}(?![A-Za-z0-9_])"),
    re.compile(r"(?<![A-Za-z0-9_-])xox[baprs]-[A-Za-z0-9]+(?:-[A-Za-z0-9]+)+(?![A-Za-z0-9_-])"),
    re.compile(rf"(?<![A-Za-z0-9_-])AIza{_URLSAFE}{{35}}(?!{_URLSAFE})"),
    re.compile(r"(?<![A-Za-z0-9_])(?:sk|pk|rk)_(?:live|test)_[A-Za-z0-9]{16,}(?![A-Za-z0-9_])"),
    re.compile(rf"(?<!{_URLSAFE})eyJ{_URLSAFE}{{8,}}\.{_URLSAFE}{{8,}}\.{_URLSAFE}{{8,}}(?!{_URLSAFE})"),
    # The body may not contain "-----": an unterminated BEGIN then stops at the next marker
    # instead of rescanning the rest of the text (quadratic on many BEGINs).
    re.compile(r"-----BEGIN ([A-Z0-9]+ )*PRIVATE KEY-----((?!-----)[\s\S])*-----END ([A-Z0-9]+ )*PRIVATE KEY-----"),
]
# OpenAI-style keys are checked separately: "sk-" starts ordinary hyphenated words
# ("sk-learn-compatible-wrappers"), while a random key always mixes letters and digits.
_OPENAI = re.compile(rf"(?<!{_URLSAFE})sk-(?:proj-)?{_URLSAFE}{{20,}}(?!{_URLSAFE})")
# `<sensitive word><suffix> = value`, matched from the word on: any prefix is allowed (db_password,
# AWS_SECRET_...) and leaving it out keeps the scan linear. The suffix list is closed so that
# token_count, tokenizer and secretName are not keys. Only the value is reported.
_ASSIGN = re.compile(
    r"""(?:passw(?:or)?d|passphrase|secret|api[_-]?key|apikey|access[_-]?key|private[_-]?key|token|credentials?)
    (?:[_-](?:key|id|value|access[_-]key))?
    ["']?[ \t]*[:=][ \t]*
    (?:"(?P<dq>[^"\n]{8,})"|'(?P<sq>[^'\n]{8,})'|(?P<bare>[^\s"'`,;]{8,}))""",
    re.IGNORECASE | re.VERBOSE,
)
# The password in a URL: postgres://user:<password>@host.
_URL_PASSWORD = re.compile(r"://[^\s:/@]+:(?P<bare>[^\s/@]{8,})@")
# CLI flags and HTTP auth put the value after a space: --password s3cret, Bearer <t>. Only these
# two forms ("password is ..." in prose is fine), and a digit so "Bearer authentication" is not.
_SPACED = re.compile(
    r"(?:--(?:password|passwd|token|api-key|secret)[ \t]+|\bBearer[ \t]+)(?=[^\s\"'`,;]*\d)(?P<bare>[^\s\"'`,;]{8,})"
)
# Values that are references or placeholders rather than secrets: ${VAR}, <your-key>,
# os.environ["X"], masked "********", YOUR_API_KEY_HERE.
_NOT_A_VALUE = re.compile(r"^[$%<{*]|[()\[\]{}<>]|^(?:your|replace|insert|enter)[_-]", re.IGNORECASE)


def _luhn_ok(digits: str) -> bool:
    doubled = (int(ch) * (2 if i % 2 else 1) for i, ch in enumerate(reversed(digits)))
    return sum(d - 9 if d > 9 else d for d in doubled) % 10 == 0


def _card_ok(s: str) -> bool:
    digits = re.sub(r"[ -]", "", s)
    # Issuer prefixes start with 2-6 (Mastercard 2-series, Amex/Diners/JCB, Visa, MC, Discover);
    # this drops ms timestamps ("17...") and ISBN-13s ("978...") that pass Luhn by chance.
    return 13 <= len(digits) <= 19 and digits[0] in "23456" and _luhn_ok(digits)


def _iban_ok(s: str) -> bool:
    compact = s.replace(" ", "")
    if not 15 <= len(compact) <= 34 or compact[:2] not in _IBAN_COUNTRIES:
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


def _valid_ipv4(s: str) -> bool:
    parts = s.split(".")
    return len(parts) == 4 and all(p.isdigit() and p == str(int(p)) and int(p) <= 255 for p in parts)


def _valid_ipv6(s: str) -> bool:
    if s.count("::") > 1 or ":::" in s or not any(c.isdigit() for c in s):
        return False
    if "." in s:  # an embedded IPv4 tail stands in for the last two groups
        head, _, v4 = s.rpartition(":")
        if not _valid_ipv4(v4):
            return False
        s = head + ":0:0"
    compressed = "::" in s
    left, _, right = s.partition("::") if compressed else (s, "", "")
    groups = (left.split(":") if left else []) + (right.split(":") if right else [])
    # Without "::" exactly 8 groups: rules out times 12:30:45 and MACs 00:1A:2B:3C:4D:5E.
    if (compressed and len(groups) > 7) or (not compressed and len(groups) != 8):
        return False
    # Runs of tiny groups are code or ratios (a[1::2], A::B, 1:2:3:4:5:6:7:8); real addresses
    # have a wide group (fe80::1, 2001:db8::1). The loopback ::1 is the one exception.
    if s != "::1" and not any(len(g) >= 3 for g in groups):
        return False
    return all(1 <= len(g) <= 4 and all(c in "0123456789abcdefABCDEF" for c in g) for g in groups)


# --- gates ------------------------------------------------------------------------------------
# The patterns above cost ~1 MB/s together in Python's re (look-arounds tried at every
# position). Each has a much cheaper *necessary* condition: a literal it must contain, or a
# short run it must match. A text without it cannot match, so skipping the pattern changes
# no finding; on ordinary prose most texts fail most gates.
_GATE_DIGITS3 = re.compile(r"\d{3}")
_GATE_DIGITS4 = re.compile(r"\d{4}")
_GATE_DOTTED = re.compile(r"\d\.\d")
_GATE_IPV6 = re.compile(r":[0-9A-Fa-f]{0,4}:")
_GATE_IBAN = re.compile(r"[A-Z]{2}\d\d")
_ASSIGN_WORDS = ("passw", "passphrase", "secret", "api", "access", "private", "token", "credential")
_SECRET_LITERALS = (("AKIA", "ASIA"), ("gh",), ("github_pat_",), ("xox",), ("AIza",), ("_live_", "_test_"), ("eyJ",),
                    ("-----BEGIN",))  # one tuple per _SECRET_SHAPES pattern, in order


def _has(text: str, *needles: str) -> bool:
    return any(n in text for n in needles)


def _spans(pattern: re.Pattern[str], text: str, ok: Callable[[str], bool] | None = None) -> Iterator[Span]:
    for m in pattern.finditer(text):
        if ok is None or ok(m.group()):
            yield m.span()


def _emails(text: str) -> Iterator[Span]:
    if "@" not in text:
        return
    for m in _EMAIL.finditer(text):
        if not _RETINA.search(m.group()) and not _URL_USERINFO.search(text, max(0, m.start() - 256), m.start()):
            yield m.span()


def _phones(text: str) -> Iterator[Span]:
    if "+" in text:
        yield from _spans(_PHONE_INTL, text, lambda s: 7 <= sum(c.isdigit() for c in s) <= 15)
    # NANP area codes never start with 0 or 1, which drops most dashed part numbers.
    if _GATE_DIGITS3.search(text):
        yield from _spans(_PHONE_NANP, text, lambda s: re.sub(r"^1[ .-]|\D", "", s)[0] in "23456789")


def _ips(text: str) -> Iterator[Span]:
    for m in _IPV4.finditer(text) if _GATE_DOTTED.search(text) else ():
        if not _VERSION_CONTEXT.search(text[max(0, m.start() - 12) : m.start()]):
            yield m.span()
    if _GATE_IPV6.search(text):
        yield from _spans(_IPV6, text, _valid_ipv6)


def _ibans(text: str) -> Iterator[Span]:
    for m in _IBAN.finditer(text) if _GATE_IBAN.search(text) else ():
        # A grouped IBAN may have swallowed a following 4-character word ("... 7034 2024");
        # drop trailing groups until the checksum holds.
        candidate = m.group()
        while not _iban_ok(candidate) and " " in candidate:
            candidate = candidate.rsplit(" ", 1)[0]
        if _iban_ok(candidate):
            yield m.start(), m.start() + len(candidate)


def _secrets(text: str) -> Iterator[Span]:
    for pattern, literals in zip(_SECRET_SHAPES, _SECRET_LITERALS, strict=True):
        if _has(text, *literals):
            yield from _spans(pattern, text)
    if "sk-" in text:
        yield from _spans(_OPENAI, text, lambda s: bool(re.search(r"\d", s[3:]) and re.search(r"[A-Za-z]", s[3:])))
    assign = _has(text, ":", "=") and _has(text.lower(), *_ASSIGN_WORDS)
    matches = (*(_ASSIGN.finditer(text) if assign else ()), *(_SPACED.finditer(text) if _has(text, "--", "Bearer") else ()),
               *(_URL_PASSWORD.finditer(text) if "://" in text else ()))
    for m in matches:
        group = next(g for g, v in m.groupdict().items() if v is not None)
        value = m.group(group)
        if not _NOT_A_VALUE.search(value) and len(set(value)) > 1:
            yield m.span(group)


_DETECTORS: dict[str, Callable[[str], Iterator[Span]]] = {
    "email": _emails,
    "phone": _phones,
    "card": lambda t: _spans(_CARD, t, _card_ok) if _GATE_DIGITS4.search(t) else iter(()),
    "ip": _ips,
    "iban": _ibans,
    "secret": _secrets,
}


def find_pii(text: str) -> list[Finding]:
    """All findings, sorted by start, non-overlapping (when two overlap keep the longer; on ties prefer the earlier kind in KINDS order)."""
    candidates = {(start, end, kind) for kind in KINDS for start, end in _DETECTORS[kind](text)}
    # Greedy by priority: longest first, then KINDS order, then leftmost for determinism. Kept
    # spans never overlap, so they stay sorted and a new one only has to be checked against its
    # two neighbours (bisect), which keeps logs with thousands of findings fast.
    ranked = sorted(candidates, key=lambda c: (-(c[1] - c[0]), KINDS.index(c[2]), c[0]))
    kept: list[tuple[int, int, str]] = []
    for cand in ranked:
        i = bisect.bisect_left(kept, cand)
        if (i == 0 or kept[i - 1][1] <= cand[0]) and (i == len(kept) or cand[1] <= kept[i][0]):
            kept.insert(i, cand)
    return [Finding(kind, s, e, text[s:e]) for s, e, kind in kept]


def redact(text: str) -> tuple[str, list[Finding]]:
    """Replace each finding with a placeholder "[REDACTED_<KIND>]" (e.g. [REDACTED_EMAIL]); return new text and findings."""
    findings = find_pii(text)
    out: list[str] = []
    pos = 0
    for f in findings:
        out += [text[pos : f.start], f"[REDACTED_{f.kind.upper()}]"]
        pos = f.end
    return "".join(out + [text[pos:]]), findings
