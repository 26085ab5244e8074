"""lmctl.pii against a labeled set (tests/assets/pii_labeled.jsonl) plus focused unit tests.

The labeled set mixes lines with PII of every kind and hard negatives (versions, dates, UUIDs,
Luhn-failing numbers, bad IBAN checksums, C++ scopes, ...). A finding is a true positive only
when its kind and text equal a labeled span, so a detector that grabs a few characters too
many or too few is penalised twice (one false positive, one false negative).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest

from lmctl.pii import KINDS, Finding, find_pii, redact

LABELED = Path(__file__).parent / "assets" / "pii_labeled.jsonl"


def _load() -> list[tuple[str, list[tuple[str, str]]]]:
    rows: list[tuple[str, list[tuple[str, str]]]] = []
    for line in LABELED.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            rows.append((row["text"], [(s["kind"], s["text"].strip()) for s in row["spans"]]))
    return rows


def _ratio(num: int, den: int) -> float:
    return num / den if den else 1.0


def test_labeled_set_is_well_formed() -> None:
    rows = _load()
    assert len(rows) >= 120
    positives = sum(1 for _, spans in rows if spans)
    assert 0.3 <= positives / len(rows) <= 0.7
    for text, spans in rows:
        for kind, span in spans:
            assert kind in KINDS
            assert text.count(span) == 1, (text, span)
    assert {kind for _, spans in rows for kind, _ in spans} == set(KINDS)


def test_precision_and_recall_on_labeled_set() -> None:
    tp: Counter[str] = Counter()
    fp: Counter[str] = Counter()
    fn: Counter[str] = Counter()
    errors: list[str] = []
    for text, spans in _load():
        expected = Counter(spans)
        for f in find_pii(text):
            key = (f.kind, f.text.strip())
            if expected[key] > 0:
                expected[key] -= 1
                tp[f.kind] += 1
            else:
                fp[f.kind] += 1
                errors.append(f"FP {f.kind:<6} {f.text!r:<40} in {text!r}")
        for (kind, span), missing in expected.items():
            fn[kind] += missing
            errors.extend(f"FN {kind:<6} {span!r:<40} in {text!r}" for _ in range(missing))

    print(f"\n{'kind':<8}{'tp':>5}{'fp':>5}{'fn':>5}{'precision':>11}{'recall':>8}")
    for kind in KINDS:
        p, r = _ratio(tp[kind], tp[kind] + fp[kind]), _ratio(tp[kind], tp[kind] + fn[kind])
        print(f"{kind:<8}{tp[kind]:>5}{fp[kind]:>5}{fn[kind]:>5}{p:>11.3f}{r:>8.3f}")
    TP, FP, FN = sum(tp.values()), sum(fp.values()), sum(fn.values())
    precision, recall = _ratio(TP, TP + FP), _ratio(TP, TP + FN)
    print(f"{'overall':<8}{TP:>5}{FP:>5}{FN:>5}{precision:>11.3f}{recall:>8.3f}")
    for e in errors:
        print(e)

    assert precision >= 0.95, errors
    assert recall >= 0.95, errors
    for kind in KINDS:
        assert _ratio(tp[kind], tp[kind] + fn[kind]) >= 0.9, (kind, errors)


def test_redact_replaces_only_the_findings() -> None:
    text = "Mail alice@example.com or call +1-202-555-0173; build v1.2.3 at 12:30:45."
    redacted, findings = redact(text)
    assert redacted == "Mail [REDACTED_EMAIL] or call [REDACTED_PHONE]; build v1.2.3 at 12:30:45."
    assert [f.kind for f in findings] == ["email", "phone"]
    for f in findings:
        assert text[f.start : f.end] == f.text


def test_redact_leaves_clean_text_byte_identical() -> None:
    text = "Released v1.2.3 on 2024-01-15 at 12:30:45 for $1,234.56 — std::map, task-based, ünïcode.\n"
    assert redact(text) == (text, [])


def test_redact_placeholders_for_every_kind() -> None:
    text = (
        "a@example.com (555) 123-4567 4111 1111 1111 1111 10.0.0.1 "
        "DE89 3704 0044 0532 0130 00 AKIAIOSFODNN7EXAMPLE"
    )
    redacted, findings = redact(text)
    assert [f.kind for f in findings] == list(KINDS)
    assert redacted == " ".join(f"[REDACTED_{k.upper()}]" for k in KINDS)


def test_luhn_failing_number_is_not_a_card() -> None:
    assert [f.kind for f in find_pii("card 4111 1111 1111 1111")] == ["card"]
    assert find_pii("card 4111 1111 1111 1112") == []
    assert find_pii("card 4111111111111112") == []


def test_invalid_iban_checksum_is_not_flagged() -> None:
    assert [f.kind for f in find_pii("GB82 WEST 1234 5698 7654 32")] == ["iban"]
    assert find_pii("GB82 WEST 1234 5698 7654 33") == []
    assert find_pii("DE00370400440532013000") == []


def test_assignment_keeps_the_key_name() -> None:
    assert redact("password=hunter2secret")[0] == "password=[REDACTED_SECRET]"
    assert redact('api_key: "abcd1234efgh"')[0] == 'api_key: "[REDACTED_SECRET]"'
    assert redact("password=short")[0] == "password=short"  # under 8 characters: not a secret


@pytest.mark.parametrize(
    "text",
    [
        "task-based risk-free sk-learn",
        "std::vector<int>::iterator and a[1::2]",
        "times 12:30:45 and MAC 00:1A:2B:3C:4D:5E",
        "versions 1.2.3.4.5 and v10.0.0.1",
        "999.1.1.1 and 256.0.0.1",
        "user at example dot com, icon@2x.png",
    ],
)
def test_hard_negatives(text: str) -> None:
    assert find_pii(text) == []


def test_findings_are_sorted_and_non_overlapping() -> None:
    for text, _ in _load():
        findings = find_pii(text)
        assert findings == sorted(findings, key=lambda f: f.start)
        for a, b in zip(findings, findings[1:]):
            assert a.end <= b.start
        for f in findings:
            assert f.kind in KINDS and text[f.start : f.end] == f.text


def test_overlaps_keep_the_longer_then_the_earlier_kind() -> None:
    # The phone lies inside a longer quoted secret value: the secret wins.
    text = 'secret = "call +1-202-555-0173 now"'
    assert find_pii(text) == [Finding("secret", 10, 34, "call +1-202-555-0173 now")]
    # Same span as an email and as an assignment value: "email" comes first in KINDS.
    assert find_pii("password=alice@example.com") == [Finding("email", 9, 26, "alice@example.com")]
    # The value of `token=` is also a JWT shape: one finding, not two.
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJlLWZha2U"
    assert find_pii(f"token={jwt}") == [Finding("secret", 6, 6 + len(jwt), jwt)]


ADVERSARIAL_UNITS = ["1", "1:", "a.b-", "+1 ", "1 ", "1.", "1-", "a@", "a.", "ABCD ", "password", "password: '", "eyJa.",
                     "ff::", "sk-a", "://a:", "-----BEGIN PRIVATE KEY-----\n"]


@pytest.mark.parametrize("unit", ADVERSARIAL_UNITS)
def test_no_catastrophic_backtracking(unit: str) -> None:
    # Adversarial repetitions of each pattern's building blocks must scan in (near) linear time.
    text = unit * (20_000 // len(unit))
    t0 = time.perf_counter()
    find_pii(text)
    assert time.perf_counter() - t0 < 1.0


def test_version_context_needs_a_whole_word() -> None:
    # "Server" ends in "ver": an address after it is still an address.
    assert [f.text for f in find_pii("Server 192.168.10.20 serves one request.")] == ["192.168.10.20"]
    assert [f.text for f in find_pii("Observer 10.0.0.1 saw it")] == ["10.0.0.1"]
    assert find_pii("version 1.2.3.4 shipped") == []
