"""The output guard: on its own (findings split across stream deltas, each action, the hold-back), then in
real servers with the openai SDK, plain and streamed."""

from __future__ import annotations

import json
import random
import re
from dataclasses import replace
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lmctl.pii import DEFAULT, find_pii
from lmctl.serve.guard import HOLD_CHARS, OutputGuard
from serve_support import log_records

TEXT = ("Sure. Write to jane.doe@example.com or call +44 20 7946 0958 about card 4111 1111 1111 1111; "
        "the staging host is 10.0.12.7 and the codename is BLUEBIRD-7. Thanks for asking, that is all.")


def _chunks(text: str, seed: int) -> list[str]:
    """`text` cut at random places, as a token stream would deliver it (1 to 4 characters a delta)."""
    rng, out, i = random.Random(seed), [], 0
    while i < len(text):
        n = rng.randint(1, 4)
        out.append(text[i:i + n])
        i += n
    return out


def _through(action: str, chunks: list[str], deny: list[str] | None = None) -> tuple[str, object]:
    guarded = OutputGuard(action, deny or []).stream()
    sent = "".join(guarded.push(c) for c in chunks) + guarded.finish()
    return sent, guarded


@pytest.mark.parametrize("seed", range(5))
def test_redact_catches_matches_split_across_deltas(seed: int) -> None:
    sent, guarded = _through("redact", _chunks(TEXT, seed), deny=[r"BLUEBIRD-\d+"])
    assert sent == ("Sure. Write to [REDACTED_EMAIL] or call [REDACTED_PHONE] about card [REDACTED_CARD]; "
                    "the staging host is [REDACTED_IP] and the codename is [REDACTED_DENY]. Thanks for asking, "
                    "that is all.")
    assert sorted(guarded.events) == sorted([("email", "redact"), ("phone", "redact"), ("card", "redact"),  # type: ignore[attr-defined]
                                             ("ip", "redact"), ("deny", "redact")])


def test_overlapping_findings_leave_nothing_out() -> None:
    text = "Contact: jane.doe@example.com today. " + "ab " * 30
    sent, _ = _through("redact", _chunks(text, 0), deny=[r"Contact: jane", r"ab ab"])
    assert sent == "[REDACTED_DENY][REDACTED_EMAIL] today. " + "[REDACTED_DENY] " * 15


def test_redact_holds_back_only_a_bounded_tail() -> None:
    guarded = OutputGuard("redact", []).stream()
    prose = "plain words without anything personal in them " * 6
    sent = "".join(guarded.push(c) for c in _chunks(prose, 1))
    assert len(prose) - HOLD_CHARS - 12 <= len(sent) < len(prose)  # at most the window and a word held back
    assert sent + guarded.finish() == prose and guarded.events == []


def test_a_long_key_is_held_whole_and_a_pem_block_to_its_end() -> None:
    key = "sk-proj-" + "aB3dE5gH7jK9mN1pQ3sT5vX7zA9cE1gI3kM5oQ7sU9wY1" * 2
    pem = "-----BEGIN PRIVATE KEY-----\n" + "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC " * 8 + "\n-----END PRIVATE KEY-----"
    sent, _ = _through("redact", _chunks(f"the key is {key} and {pem} done", 3))
    assert sent == "the key is [REDACTED_SECRET] and [REDACTED_SECRET] done"


def test_refuse_stops_before_the_finding_and_flag_changes_nothing() -> None:
    sent, guarded = _through("refuse", _chunks(TEXT, 2))
    assert sent == "Sure. Write to " and guarded.refused and guarded.events == [("email", "refuse")]  # type: ignore[attr-defined]
    assert guarded.push("more") == "" and guarded.finish("rest") == ""  # type: ignore[attr-defined]
    chunks = _chunks(TEXT, 2)
    flagged = OutputGuard("flag", []).stream()
    assert [flagged.push(c) for c in chunks] == chunks  # nothing held back: flag costs a stream no latency
    flagged.finish()
    assert sorted(k for k, _ in flagged.events) == ["card", "email", "ip", "phone"]
    off = OutputGuard("off", []).stream()
    assert "".join(off.push(c) for c in chunks) + off.finish() == TEXT and off.events == []


def test_the_guard_checks_with_the_data_detector_plus_its_deny_list() -> None:
    guard = OutputGuard("redact", [r"BLUEBIRD-\d+"])
    assert replace(guard.detector, deny=()) == DEFAULT  # what `lmctl data` and the serve sample log use
    assert [f.kind for f in guard.detector.find("BLUEBIRD-7 at 10.0.12.7")] == ["deny", "ip"]


# --- through a real server, with the openai SDK ---------------------------------------------------

MODEL = "tiny"
PROMPT = "The model"


def _server(model: Path, action: str, deny: list[str], **options: object):  # type: ignore[no-untyped-def]
    from conftest import free_port
    from serve_support import LiveServer

    from lmctl.serve import build_app
    from lmctl.serve.settings import ServeSettings

    settings = ServeSettings(served_model_name=MODEL, output_guard=action, output_deny=deny, **options)  # type: ignore[arg-type]
    return LiveServer(build_app(str(model), settings, []), free_port())


def _both(url: str) -> tuple[openai.types.Completion, list[openai.types.Completion]]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    args = {"model": MODEL, "prompt": PROMPT, "max_tokens": 40, "temperature": 0}
    return client.completions.create(**args), list(client.completions.create(**args, stream=True))  # type: ignore[call-overload]


def _events(url: str) -> dict[tuple[str, str], float]:
    text = httpx.get(f"{url}/metrics").text
    return {(s.labels["kind"], s.labels["action"]): s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == "lmctl_output_guard_events_total"}


@pytest.fixture(scope="module")
def greedy(tiny_base: Path) -> tuple[str, str]:
    """The tiny model's greedy text for PROMPT (through the default `flag` guard, which changes
    nothing) and a run of it to deny-list: an untrained model writes no e-mail address, so the
    server-level tests plant their finding as a deny pattern over text it really generates."""
    with _server(tiny_base, "flag", [r"\S"]) as srv:
        plain, chunks = _both(srv.url)
        assert _events(srv.url)[("deny", "flag")] >= 2  # flag counted (both requests) and changed nothing
    text = plain.choices[0].text
    assert "".join(c.choices[0].text for c in chunks) == text and find_pii(text) == []
    runs = [m for m in re.finditer(r"\S{3,}", text) if m.start() > 0]
    assert len(runs) >= 3, text
    middle = len(runs) // 2  # two words and the space between: several tokens, so several deltas
    return text, text[runs[middle].start():runs[middle + 1].end()]


def test_redact_rewrites_plain_and_streamed_text(tiny_base: Path, greedy: tuple[str, str], tmp_path: Path) -> None:
    text, secret = greedy
    sample = tmp_path / "sample.jsonl"
    with _server(tiny_base, "redact", [re.escape(secret)], sample_log=sample, sample_rate=1.0) as srv:
        plain, chunks = _both(srv.url)
        events = _events(srv.url)
    expected = text.replace(secret, "[REDACTED_DENY]")
    assert plain.choices[0].text == expected and plain.choices[0].finish_reason == "length"
    assert "".join(c.choices[0].text for c in chunks) == expected  # a match split over deltas is caught
    assert events[("deny", "redact")] == 2 * text.count(secret)
    rows = [json.loads(line) for line in sample.read_text().splitlines()]
    assert [r["completion"] for r in rows] == [expected, expected]  # the sample log keeps what was sent


def test_refuse_ends_with_content_filter(tiny_base: Path, greedy: tuple[str, str]) -> None:
    text, secret = greedy
    with _server(tiny_base, "refuse", [re.escape(secret)]) as srv:
        with log_records("lmctl.serve") as records:
            plain, chunks = _both(srv.url)
        events = _events(srv.url)
    before = text[:text.index(secret)]
    assert plain.choices[0].text == before and plain.choices[0].finish_reason == "content_filter"
    assert "".join(c.choices[0].text for c in chunks) == before
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    assert events[("deny", "refuse")] == 2
    logged = " ".join(r.getMessage() for r in records)
    assert "output guard refuse: deny" in logged and secret not in logged  # the kind, never the text
