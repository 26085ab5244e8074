"""Phone numbers, found and checked by `phonenumbers` (Google's libphonenumber, as Presidio uses).

How a span becomes a phone finding:
1. A cheap gate (`_WINDOW`) finds runs of >= 7 digits joined by at most two of ` .-()`; only
   these windows are handed to the library, so prose without such runs costs almost nothing.
2. `phonenumbers.PhoneNumberMatcher` with `Leniency.POSSIBLE` extracts numbers from each window,
   once per configured region for national forms (`020 7946 0958` means something only in a
   region) and once for international forms (`+44 ...`, region-independent).
3. lmctl's filter on top, because POSSIBLE (length plausible for the region) alone accepts
   decimals, dates and ISBNs. A number is kept when its written form is one a person uses
   for a phone *and* the library agrees:
   - international: starts with `+`; the library says possible;
   - national, in a region whose trunk prefix is 0 (GB, DE, FR, IN, AU, ...): starts with 0
     or "(0", no group of one digit; NANP regions (US, CA, ...): the 3-3-4 / (3) 3-4
     grouping, area code 2-9 (always: bare 10-digit runs are too often IDs);
     regions without a trunk prefix (ES, IT, ...): the library says *valid*;
   - a bare run of digits (no separator) must be *valid*, not just possible: bare runs are
     mostly IDs, invoices and timestamps;
   - never a decimal (`2.718281828`), a date (`15.01.2024`), or a fragment of a longer token
     (a letter, digit, `.`, `-`, `/`, `+` or a digit group right before it; a word character or
     `-x`/`.x` after), nor a number right after "ISBN"/"ISSN".

Why POSSIBLE and not VALID (the matcher's and Presidio's default): VALID requires the number to
lie in a range the metadata knows as allocated, which rejects the fictional ranges used in
examples and test data (Ofcom's drama numbers `07700 900123`, NANP `555-xxxx` area code) and
newly allocated ranges; a redactor must remove those too. STRICT/EXACT_GROUPING would also
reject groupings people write (`0207 946 0958`). The shape rules above buy the precision back.

Default regions (`DEFAULT_REGIONS`): US (the NANP metadata also covers CA and the Caribbean), GB,
IN, AU (the largest English-speaking populations, which is what an English LM corpus mostly
holds), DE and FR (the largest EU languages with national trunk-prefix formats). International
`+CC` numbers from every country are found whatever the regions. More regions cost time linearly
and each adds its national formats as false-positive surface; add the ones your data is from.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import lru_cache

import phonenumbers
from phonenumbers import Leniency, PhoneMetadata, PhoneNumberMatcher

from lmctl.errors import BadInputError

DEFAULT_REGIONS: tuple[str, ...] = ("US", "GB", "DE", "FR", "IN", "AU")

_WINDOW = re.compile(r"\+?\(?\d(?:[ .()\-]{0,2}\d){6,}\)?")
_NANP = re.compile(r"(?:1[ .-])?(?:\([2-9]\d\d\) ?\d{3}[ .-]\d{4}|[2-9]\d\d([ .-])\d{3}\1\d{4})")
_GROUP_END = re.compile(r"\d(?!\d)")
_NEXT_GROUP = re.compile(r"[+(]?\d")
_ONE_DIGIT_GROUP = re.compile(r"(?<!\d)\d(?!\d)")
_DECIMAL = re.compile(r"\+?\d+\.\d+")
_DATE = re.compile(r"\d{1,2}([./-])\d{1,2}\1\d{2,4}|\d{4}([./-])\d{1,2}\2\d{1,2}")
_BEFORE_BAD = re.compile(r"[\w.\-/+]|\d[ .\-]")  # tested on the 1-2 characters before the match
_AFTER_BAD = re.compile(r"\w|[.\-/]\w")
_BOOK_CONTEXT = re.compile(r"\b(?:ISBN|ISSN)(?:-1[03])?:?\s*$", re.IGNORECASE)


def check_regions(regions: tuple[str, ...]) -> tuple[str, ...]:
    """The regions upper-cased, or BadInputError naming the unknown ones (ISO 3166 alpha-2, e.g. GB not UK)."""
    upper = tuple(dict.fromkeys(r.strip().upper() for r in regions))
    unknown = [r for r in upper if r not in phonenumbers.SUPPORTED_REGIONS]
    if unknown:
        raise BadInputError(f"unknown phone region(s) {', '.join(unknown)}: use ISO 3166 alpha-2 codes such as US, GB, DE")
    return upper


@lru_cache(maxsize=None)
def _trunk(region: str) -> str | None:
    meta = PhoneMetadata.metadata_for_region(region)
    return meta.national_prefix if meta is not None else None


def _national_form_ok(raw: str, region: str) -> bool | None:
    """Whether `raw` is written as a national number of `region` (None: only if the library says valid)."""
    trunk = _trunk(region)
    if trunk == "1":
        return _NANP.fullmatch(raw) is not None
    if trunk:  # "step 0 1234567", "page 0 1 2 3 4 5 6 7": a one-digit group is no national format
        return raw.lstrip("(").startswith(trunk) and not _ONE_DIGIT_GROUP.search(raw)
    return None


@lru_cache(maxsize=4096)  # a stream's overlapping scans (lmctl.pii.stream) ask about the same candidates again
def _verdict(raw: str, region: str) -> int:
    """The library's verdict on a candidate with a phone's written form in `region`: 0 no, 1 possible, 2 valid."""
    form = True if raw.startswith("+") else _national_form_ok(raw, region)
    if form is False:
        return 0
    try:
        number = phonenumbers.parse(raw, region)
    except phonenumbers.NumberParseException:
        return 0
    if phonenumbers.is_valid_number(number):
        return 2
    # No trunk-prefix form to go by, or a bare run of digits: only a valid number will do.
    return int(form is not None and not raw.isdigit() and phonenumbers.is_possible_number(number))


def _in_context(text: str, start: int, end: int, after_phone: bool) -> bool:
    raw = text[start:end]
    before = text[max(0, start - 2) : start]
    fragment = _BEFORE_BAD.fullmatch(before[-1:]) or _BEFORE_BAD.fullmatch(before)
    if (fragment and not after_phone) or _AFTER_BAD.match(text, end):
        return False
    return not (_DECIMAL.fullmatch(raw) or _DATE.fullmatch(raw) or _BOOK_CONTEXT.search(text, max(0, start - 12), start))


def _prefixes(text: str, start: int, stop: int) -> list[int]:
    """End offsets of text[start:stop]'s prefixes that end on a digit group and hold 7-17 digits, longest first."""
    ends: list[int] = []
    pos, digits = start, 0
    for m in _GROUP_END.finditer(text, start, stop):
        digits += sum(c.isdigit() for c in text[pos : m.end()])
        if digits > 17:  # longer than any phone number: later prefixes are longer still
            break
        pos = m.end()
        if digits >= 7:
            ends.append(pos)
    return ends[::-1]


def _best_end(text: str, start: int, stop: int, regions: tuple[str, ...], after_phone: bool) -> int | None:
    """The end of the phone number that starts at `start`: the longest valid prefix, else the longest possible one.

    "020 7946 0958 2" is a possible German number, but "020 7946 0958" is a valid British one."""
    tried = regions[:1] if text.startswith("+", start) else regions  # "+" numbers parse alike in every region
    possible = None
    for end in _prefixes(text, start, stop):
        if not _in_context(text, start, end, after_phone):
            continue
        verdict = max((_verdict(text[start:end], r) for r in tried), default=0)
        if verdict == 2:
            return end
        possible = possible or (end if verdict else None)
    return possible


def phone_spans(text: str, regions: tuple[str, ...] = DEFAULT_REGIONS) -> Iterator[tuple[int, int]]:
    """(start, end) of each phone number in `text`, national forms read in `regions` (already checked).

    A window is read from its start; after a number, the next digit group may start another
    ("020 7946 0958 020 7946 0959"), otherwise the rest of the window is a longer token's tail."""
    for window in _WINDOW.finditer(text):
        start, after_phone = window.start(), False
        while (end := _best_end(text, start, window.end(), regions, after_phone)) is not None:
            yield _balanced(text, start, end)
            nxt = _NEXT_GROUP.search(text, end, window.end())
            if nxt is None:
                break
            start, after_phone = nxt.start(), True


def _balanced(text: str, start: int, end: int) -> tuple[int, int]:
    """Leave out a parenthesis that belongs to the prose: "(see 020 7946 0958)", "(020) 7946 0958" kept whole."""
    raw = text[start:end]
    if raw.endswith(")") and raw.count(")") > raw.count("("):
        end -= 1
    if raw.startswith("(") and raw.count("(") > raw.count(")"):
        start += 1
    return start, end
