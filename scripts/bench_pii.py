"""Precision and recall of lmctl.pii per kind on the labelled set, beside Presidio's analyzer.

The set is tests/assets/pii_labeled.jsonl: one text per line with its labelled spans (kind and
exact text). A finding counts as a true positive only when kind and text both equal a labelled
span (a span a character too long is one false positive plus one false negative).

Peer: Microsoft Presidio's `AnalyzerEngine` with its default recognizers, when
`presidio-analyzer` is importable. Its NLP engine needs a spaCy pipeline; the trained English
models (en_core_web_sm/lg) are not on PyPI (spaCy installs them from GitHub releases), so the
peer runs on `spacy.blank("en")`, a tokenizer without NER: every recognizer for the kinds
compared here is a pattern or `phonenumbers` recognizer and needs no NER, but context words
cannot lift scores through lemmas. Entities: EMAIL_ADDRESS, PHONE_NUMBER, CREDIT_CARD,
IP_ADDRESS, IBAN_CODE, at Presidio's default score threshold (0). Presidio has no recognizer for
credentials, so its secret row is n/a. Without presidio-analyzer every peer cell is n/a with the reason.

Speed: ms per KB of text for each detector in this process, on the labelled set (dense with
digits) and on prose (Python's language reference from `pydoc_data.topics`, which every Python
ships), and lmctl's StreamRedactor fed that prose in 8-character chunks.

    python scripts/bench_pii.py [--set tests/assets/pii_labeled.jsonl] [--regions US,GB,DE,FR,IN,AU]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmctl.pii import DEFAULT_REGIONS, KINDS, Detector  # noqa: E402
from lmctl.pii.stream import StreamRedactor  # noqa: E402

LABELED = Path(__file__).resolve().parents[1] / "tests" / "assets" / "pii_labeled.jsonl"
PRESIDIO_KINDS = {"EMAIL_ADDRESS": "email", "PHONE_NUMBER": "phone", "CREDIT_CARD": "card", "IP_ADDRESS": "ip",
                  "IBAN_CODE": "iban"}
Finder = Callable[[str], list[tuple[str, str]]]  # text -> [(kind, matched text)]
Row = tuple[str, list[tuple[str, str]]]


def load(path: Path = LABELED) -> list[Row]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            rows.append((row["text"], [(s["kind"], s["text"].strip()) for s in row["spans"]]))
    return rows


def score(find: Finder, rows: list[Row]) -> tuple[dict[str, tuple[int, int, int]], list[str]]:
    """Per kind (tp, fp, fn), and one line per error."""
    tp: Counter[str] = Counter()
    fp: Counter[str] = Counter()
    fn: Counter[str] = Counter()
    errors: list[str] = []
    for text, spans in rows:
        expected = Counter(spans)
        for kind, found in find(text):
            key = (kind, found.strip())
            if expected[key] > 0:
                expected[key] -= 1
                tp[kind] += 1
            else:
                fp[kind] += 1
                errors.append(f"FP {kind:<6} {found!r:<40} in {text!r}")
        for (kind, span), missing in expected.items():
            fn[kind] += missing
            errors.extend(f"FN {kind:<6} {span!r:<40} in {text!r}" for _ in range(missing))
    return {k: (tp[k], fp[k], fn[k]) for k in KINDS}, errors


def ratio(num: int, den: int) -> float:
    return num / den if den else 1.0


def precision_recall(tp: int, fp: int, fn: int) -> tuple[float, float]:
    return ratio(tp, tp + fp), ratio(tp, tp + fn)


def presidio_finder() -> tuple[Finder | None, str]:
    try:
        import logging
        import tempfile

        import spacy
        from presidio_analyzer import AnalyzerEngine
        from presidio_analyzer.nlp_engine import SpacyNlpEngine
    except ImportError as exc:
        return None, f"presidio-analyzer not importable (no module {exc.name!r}; `make peers` installs it)"
    logging.getLogger("presidio-analyzer").setLevel(logging.ERROR)
    blank = tempfile.mkdtemp(prefix="spacy-blank-en-")
    spacy.blank("en").to_disk(blank)
    engine = AnalyzerEngine(nlp_engine=SpacyNlpEngine(models=[{"lang_code": "en", "model_name": blank}]),
                            supported_languages=["en"])
    entities = list(PRESIDIO_KINDS)

    def find(text: str) -> list[tuple[str, str]]:
        results = engine.analyze(text, language="en", entities=entities)
        return [(PRESIDIO_KINDS[r.entity_type], text[r.start : r.end]) for r in _non_overlapping(results)]

    find("warm up tldextract a@example.com")
    return find, "spaCy blank('en'), no NER"


def _non_overlapping(results: list) -> list:
    # Presidio may report one span as two entities (a number as PHONE and CREDIT_CARD): keep the best score.
    kept: list = []
    for r in sorted(results, key=lambda r: (-r.score, r.start)):
        if all(r.end <= k.start or k.end <= r.start for k in kept):
            kept.append(r)
    return kept


def ms_per_kb(find: Finder, texts: list[str], repeat: int = 3) -> float:
    size_kb = sum(len(t.encode()) for t in texts) / 1024
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for t in texts:
            find(t)
        best = min(best, time.perf_counter() - t0)
    return best * 1000 / size_kb


def prose() -> list[str]:
    from pydoc_data.topics import topics

    return [p for text in topics.values() for p in text.split("\n\n") if p.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", type=Path, default=LABELED)
    parser.add_argument("--regions", default=",".join(DEFAULT_REGIONS))
    args = parser.parse_args()
    rows = load(args.set)
    detector = Detector(regions=tuple(args.regions.split(",")))

    def lmctl_find(text: str) -> list[tuple[str, str]]:
        return [(f.kind, f.text) for f in detector.find(text)]

    peer, why = presidio_finder()
    ours, errors = score(lmctl_find, rows)
    theirs = score(peer, rows)[0] if peer else None
    print(f"{len(rows)} texts, {sum(len(s) for _, s in rows)} labelled spans; regions {','.join(detector.regions)}; "
          f"peer: Presidio {why}")
    print(f"{'kind':<8}{'n':>4}{'lmctl P':>9}{'R':>7}{'presidio P':>12}{'R':>7}")
    for kind in KINDS:
        tp, fp, fn = ours[kind]
        p, r = precision_recall(tp, fp, fn)
        if theirs is None or kind not in PRESIDIO_KINDS.values():
            peer_cells = f"{'n/a':>12}{'':>7}"
        else:
            pp, pr = precision_recall(*theirs[kind])
            peer_cells = f"{pp:>12.3f}{pr:>7.3f}"
        print(f"{kind:<8}{tp + fn:>4}{p:>9.3f}{r:>7.3f}{peer_cells}")
    if peer is None:
        print(f"peer n/a: {why}")
    texts, docs = [t for t, _ in rows], prose()
    print(f"speed ms/KB (best of 3)  labelled set: lmctl {ms_per_kb(lmctl_find, texts):.3f}"
          + (f", presidio {ms_per_kb(peer, texts):.3f}" if peer else "")
          + f"   prose ({sum(map(len, docs)) // 1024} KB): lmctl {ms_per_kb(lmctl_find, docs):.3f}"
          + (f", presidio {ms_per_kb(peer, docs, 1):.3f}" if peer else ""))
    joined = "\n\n".join(docs)
    t0 = time.perf_counter()
    stream = StreamRedactor(detector)
    for i in range(0, len(joined), 8):  # token-sized chunks, as a streamed completion arrives
        stream.feed(joined[i : i + 8])
    stream.flush()
    print(f"StreamRedactor (8-char chunks, holdback {stream.holdback}, step {stream.step}) on prose: "
          f"{(time.perf_counter() - t0) * 1000 / (len(joined.encode()) / 1024):.3f} ms/KB")
    for line in errors:
        print(line)


if __name__ == "__main__":
    main()
