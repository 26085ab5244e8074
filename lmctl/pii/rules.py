"""lmctl's own rules for the kinds no library does better: email, card, ip, iban, secret.

Why hand-written: phonenumbers (lmctl.pii.phones) covers phones; for the rest no maintained
library beats a shape plus the real check. Email has no checksum (the address grammar of RFC 5322
matches far too much prose, so a practical subset is used). Cards get Luhn plus issuer prefixes,
IBANs ISO 13616 mod-97 plus the list of issuing countries, IPs are validated by the
stdlib `ipaddress` module (plus a filter for code such as `a::b`), secrets the
published token formats (AWS, GitHub, Slack, Google, Stripe, OpenAI, JWT, PEM private keys,
Bearer tokens, `password=` style assignments). Presidio's own recognizers for these kinds are
regexes of the same kind; detect-secrets/truffleHog are scanners for files, not span finders.

Design:
- Each kind is a regular expression that proposes *candidates* plus, where the shape alone is
  ambiguous, a validator with the real rule. Regexes are cheap at recall; validators buy the precision.
- Every pattern is anchored by explicit look-arounds instead of ``\\b``, because the common
  false positives are *fragments* of larger tokens: an IP inside the version ``1.2.3.4.5``, a
  card inside a UUID, ``sk-`` inside ``task-based``.
- Repetitions always have a mandatory separator between groups, so no pattern can backtrack
  exponentially on long runs of digits, hex or colons.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterator

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
    try:
        ipaddress.IPv4Address(s)  # rejects octets > 255 and leading zeros ("01.2.3.4")
    except ValueError:
        return False
    return True


def _valid_ipv6(s: str) -> bool:
    try:
        ipaddress.IPv6Address(s)  # group count, "::" at most once, hex, embedded IPv4 tail
    except ValueError:
        return False
    # Valid by the grammar but not addresses in prose: runs of tiny groups are code or ratios
    # (A::B, a::b::c is already invalid); real addresses have a wide group (fe80::1, 2001:db8::1).
    # The loopback ::1 is the one exception.
    head = s.rsplit(":", 1)[0] if "." in s else s
    return any(c.isdigit() for c in s) and (s == "::1" or any(len(g) >= 3 for g in head.split(":")))


# --- gates ------------------------------------------------------------------------------------
# The patterns above cost ~1 MB/s together in Python's re (look-arounds tried at every
# position). Each has a much cheaper *necessary* condition: a literal it must contain, or a
# short run it must match. A text without it cannot match, so skipping the pattern changes
# no finding; on ordinary prose most texts fail most gates.
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


RULES: dict[str, Callable[[str], Iterator[Span]]] = {
    "email": _emails,
    "card": lambda t: _spans(_CARD, t, _card_ok) if _GATE_DIGITS4.search(t) else iter(()),
    "ip": _ips,
    "iban": _ibans,
    "secret": _secrets,
}
"""The spans (start, end) of each kind in a text, before overlaps between kinds are settled."""
