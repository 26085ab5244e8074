"""lmctl.pii's deny patterns and StreamRedactor's hold-back in the serve output guard's setting (holdback 64,
step 16, stop at the first finding): the same text as one whole-text redaction at any cut-up, long runs and
PEM blocks never split, and the detector run at most once a step."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from lmctl.errors import BadInputError
from lmctl.pii import Detector, Finding
from lmctl.pii.stream import StreamRedactor

JWT = ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ"
       ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c")
PEM = "-----BEGIN RSA PRIVATE KEY-----\n" + "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n" * 12 + "-----END RSA PRIVATE KEY-----"
DENY = (r"BLUEBIRD-\d+", r"ab ab", r"Contact: jane")


def _text() -> str:
    labelled = [json.loads(line)["text"] for line in (Path(__file__).parent / "assets" / "pii_labeled.jsonl").open()]
    return "\n".join([*labelled[:120], f"Contact: jane.doe@example.com, codename BLUEBIRD-7, {'ab ' * 9}",
                      f"session={JWT} then the key {PEM} and done.", *labelled[120:200]])


def _feed(stream: StreamRedactor, text: str, seed: int, most: int = 12) -> str:
    rng, out, pos = random.Random(seed), [], 0
    while pos < len(text):
        n = rng.randint(1, most)
        out.append(stream.feed(text[pos:pos + n]))
        pos += n
    return "".join(out) + stream.flush()


def test_deny_matches_are_findings_kept_whole_beside_overlapping_ones() -> None:
    detector = Detector(deny=DENY)
    text = "Contact: jane.doe@example.com, call BLUEBIRD-7"
    assert [(f.kind, f.text) for f in detector.find(text)] == [
        ("deny", "Contact: jane"), ("email", "jane.doe@example.com"), ("deny", "BLUEBIRD-7")]
    assert detector.redact(text)[0] == "[REDACTED_DENY][REDACTED_EMAIL], call [REDACTED_DENY]"
    inside = Detector(deny=(r"call \+44 20 7946 0958 now",)).find("call +44 20 7946 0958 now")
    assert [f.kind for f in inside] == ["deny"]  # a finding inside a deny match is not a second one
    assert Detector(deny=DENY).find("xx BLUEBIRD-7", start=4) == []  # only findings from `start` on
    with pytest.raises(BadInputError, match="not a regular expression"):
        Detector(deny=("(unclosed",))


@pytest.mark.parametrize("seed", range(4))
def test_guard_settings_pass_on_the_whole_text_redaction_at_any_cut_up(seed: int) -> None:
    detector, text = Detector(deny=DENY), _text()
    expected, findings = detector.redact(text)
    stream = StreamRedactor(detector, holdback=64, step=16, context=64)
    assert _feed(stream, text, seed) == expected
    assert stream.findings == findings


@pytest.mark.parametrize("seed", range(4))
def test_stop_passes_on_the_text_before_the_first_finding_then_nothing(seed: int) -> None:
    detector, text = Detector(deny=DENY), "plain words and more words " * 5 + _text()
    first = detector.find(text)[0]
    stream = StreamRedactor(detector, holdback=64, step=16, stop=True)
    assert _feed(stream, text, seed) == text[:first.start]
    assert stream.stopped and stream.findings == [first]
    assert stream.feed("more") == "" and stream.flush() == ""


@pytest.mark.parametrize("seed", range(4))
def test_a_run_longer_than_the_holdback_is_never_split(seed: int) -> None:
    text = f"a token glued to its label: session_cookie;jwt={JWT};path=/ and nothing more to say"
    stream = StreamRedactor(holdback=16, step=1)
    assert _feed(stream, text, seed, most=3) == text.replace(JWT, "[REDACTED_SECRET]")


def test_the_detector_runs_at_most_once_a_step_while_a_block_is_held() -> None:
    scanned: list[int] = []

    class Counting(Detector):
        def find(self, text: str, start: int = 0) -> list[Finding]:
            scanned.append(len(text))
            return super().find(text, start)

    text = "Here it is:\n" + "-----BEGIN PRIVATE KEY-----\n" + "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n" * 60 \
        + "-----END PRIVATE KEY-----\nThat was all of it, no more words after the key block today."
    stream = StreamRedactor(Counting(), holdback=64, step=16, context=64)
    assert _feed(stream, text, 0, most=4) == "Here it is:\n[REDACTED_SECRET]\nThat was all of it, no more words after the key block today."
    closed = text.index("-----END") + len("-----END PRIVATE KEY-----")
    assert min(scanned) >= closed  # nothing could be passed on while the block was open: no scan either
    assert len(scanned) <= (64 + 16) // 16 + 1  # then one a step until the held tail is past the block
