"""The output guard's cost per streamed delta in each mode, against passing the text through (`off`).

    PYTHONPATH=. python scripts/bench_guard.py [--repeat 5]

A ~2,800-character answer (prose with an e-mail, a phone, a card, an IP, a key and a deny-listed
codename in it) is cut into deltas of 2-6 characters, as a token stream delivers it, and pushed
through `OutputGuard(mode, deny).stream()`: push() per delta, finish() at the end. Prints the best
of `--repeat` runs per mode, in µs per delta and as a ratio to `off`, and checks that `redact`
passes on the whole-text redaction. The guard's API is unchanged since it was added, so the same
script measures any commit's guard (run it with that tree on PYTHONPATH). It also times
`StreamRedactor` with its defaults on the same text fed in 8-character chunks (ms per KB), against
`Detector.find` on the whole text once.
"""

from __future__ import annotations

import argparse
import logging
import random
import time

from lmctl.pii import Detector
from lmctl.pii.stream import StreamRedactor
from lmctl.serve.guard import OutputGuard

PARAGRAPH = ("Sure, here is what I found in the ticket history. The customer wrote from jane.doe@example.com "
             "and asked us to call back on +44 20 7946 0958 after the outage; the card on file ends the "
             "usual way, 4111 1111 1111 1111, and the staging host 10.0.12.7 was the one that failed. "
             "The rollout under codename BLUEBIRD-7 is paused until the review, and the deploy key "
             "sk-proj-aB3dE5gH7jK9mN1pQ3sT5vX7zA9cE1gI3kM5 should be rotated. Nothing else stands out. ")
DENY = [r"BLUEBIRD-\d+"]


def _deltas(text: str, seed: int = 0) -> list[str]:
    rng, cuts = random.Random(seed), [0]
    while cuts[-1] < len(text):
        cuts.append(cuts[-1] + rng.randint(2, 6))
    return [text[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]


def _run(mode: str, deltas: list[str]) -> tuple[float, str]:
    guarded = OutputGuard(mode, DENY).stream()
    start = time.perf_counter()
    sent = "".join(guarded.push(d) for d in deltas) + guarded.finish()
    seconds = time.perf_counter() - start
    OutputGuard(mode, DENY).record(guarded, "bench", "m", "1")  # flag's whole-text check happens here if not yet
    return seconds, sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    logging.getLogger("lmctl.serve").setLevel(logging.ERROR)  # each run logs its findings' kinds
    text = PARAGRAPH * 6
    deltas = _deltas(text)
    print(f"text {len(text)} characters in {len(deltas)} deltas of 2-6 characters, best of {args.repeat}")
    best: dict[str, float] = {}
    for _ in range(args.repeat):  # modes interleaved, so a load spike hits all of them alike
        for mode in ("off", "flag", "redact", "refuse"):
            seconds, sent = _run(mode, deltas)
            best[mode] = min(best.get(mode, float("inf")), seconds)
            if mode == "redact":
                assert "jane.doe" not in sent and "BLUEBIRD" not in sent and sent.count("[REDACTED_") == 6 * 6, sent
    for mode, seconds in best.items():
        per = seconds / len(deltas) * 1e6
        print(f"{mode:>7}: {per:8.1f} µs per delta, {seconds * 1e3 / (len(text) / 1000):6.2f} ms per KB, "
              f"{seconds / best['off']:8.1f}x off")
    _stream_redactor(text, args.repeat)


def _stream_redactor(text: str, repeat: int) -> None:
    detector, kb = Detector(), len(text.encode()) / 1024
    whole = stream = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        detector.find(text)
        whole = min(whole, time.perf_counter() - start)
        start = time.perf_counter()
        redactor = StreamRedactor(detector)
        for i in range(0, len(text), 8):
            redactor.feed(text[i:i + 8])
        redactor.flush()
        stream = min(stream, time.perf_counter() - start)
    print(f"StreamRedactor (defaults, 8-character chunks): {stream * 1e3 / kb:.2f} ms per KB, "
          f"{stream / whole:.1f}x Detector.find on the whole text ({whole * 1e3 / kb:.2f} ms per KB)")


if __name__ == "__main__":
    main()
