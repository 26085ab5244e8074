"""The output guard's cost per streamed delta in each mode, against passing the text through (`off`).

    PYTHONPATH=. python scripts/bench_guard.py [--repeat 5] [--against DIR]

A ~2,700-character answer (prose with an e-mail, a phone, a card, an IP, a key and a deny-listed
codename in it, six times) is cut into deltas of 2-6 characters, as a token stream delivers it, and
pushed through `OutputGuard(mode, deny).stream()`: push() per delta, finish() at the end. Prints the
best of `--repeat` runs per mode, in µs per delta and as a ratio to `off`, and checks that `redact`
passes on the whole-text redaction. Each run starts with phonenumbers' verdicts uncached. It also times `StreamRedactor` with its defaults on the same text
fed in 8-character chunks (ms per KB), against `Detector.find` on the whole text once.

`--against DIR`: a checkout of another commit (e.g. `git worktree add /tmp/base main`); its
`lmctl/serve/guard.py` and `lmctl/pii/stream.py` are loaded beside this tree's (on this tree's
detector) and timed in the same runs, interleaved, with the ratio new / DIR per row.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import random
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from lmctl.pii import Detector, phones
from lmctl.pii import stream as this_stream
from lmctl.serve import guard as this_guard

PARAGRAPH = ("Sure, here is what I found in the ticket history. The customer wrote from jane.doe@example.com "
             "and asked us to call back on +44 20 7946 095{i} after the outage; the card on file ends the "
             "usual way, 4111 1111 1111 1111, and the staging host 10.0.12.7 was the one that failed. "
             "The rollout under codename BLUEBIRD-7 is paused until the review, and the deploy key "
             "sk-proj-aB3dE5gH7jK9mN1pQ3sT5vX7zA9cE1gI3kM5 should be rotated. Nothing else stands out. ")
DENY = [r"BLUEBIRD-\d+"]
MODES = ("off", "flag", "redact", "refuse")


def _deltas(text: str, step: tuple[int, int], seed: int = 0) -> list[str]:
    rng, cuts = random.Random(seed), [0]
    while cuts[-1] < len(text):
        cuts.append(cuts[-1] + rng.randint(*step))
    return [text[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _cold() -> None:
    """Forget phonenumbers' verdicts cached by an earlier run (lmctl.pii.phones), where there is such a cache."""
    getattr(phones._verdict, "cache_clear", lambda: None)()


def _guard(module: Any, mode: str, deltas: list[str]) -> float:
    _cold()
    guard = module.OutputGuard(mode, DENY)
    guarded = guard.stream()
    start = time.perf_counter()
    sent = "".join(guarded.push(d) for d in deltas) + guarded.finish()
    seconds = time.perf_counter() - start
    if mode == "redact":
        assert "jane.doe" not in sent and "BLUEBIRD" not in sent and sent.count("[REDACTED_") == 36, sent
    guard.record(guarded, "bench", "m", "1")
    return seconds


def _stream(module: Any, detector: Detector, chunks: list[str]) -> float:
    _cold()
    start = time.perf_counter()
    redactor = module.StreamRedactor(detector)
    for chunk in chunks:
        redactor.feed(chunk)
    redactor.flush()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--against", type=Path, help="a checkout of another commit to time beside this tree")
    args = parser.parse_args()
    logging.getLogger("lmctl.serve").setLevel(logging.ERROR)  # each run logs its findings' kinds
    trees: dict[str, tuple[Any, Any]] = {"this": (this_guard, this_stream)}
    if args.against:
        trees["against"] = (_load(args.against / "lmctl/serve/guard.py", "against_guard"),
                            _load(args.against / "lmctl/pii/stream.py", "against_stream"))
    text, detector = "".join(PARAGRAPH.format(i=i) for i in range(6)), Detector()
    deltas, chunks, kb = _deltas(text, (2, 6)), _deltas(text, (8, 8)), len(text.encode()) / 1024
    best: dict[tuple[str, str], float] = {}
    for _ in range(args.repeat):  # everything interleaved, so a load spike hits all rows alike
        for tree, (guard, stream) in trees.items():
            times = {mode: _guard(guard, mode, deltas) for mode in MODES}
            times["StreamRedactor"] = _stream(stream, detector, chunks)
            _cold()
            start = time.perf_counter()
            detector.find(text)
            times["find"] = time.perf_counter() - start
            for row, seconds in times.items():
                best[tree, row] = min(best.get((tree, row), float("inf")), seconds)
    print(f"text {len(text)} characters; guard: {len(deltas)} deltas of 2-6 characters; StreamRedactor "
          f"(defaults): 8-character chunks; best of {args.repeat}")
    for row in (*MODES, "StreamRedactor", "find"):
        cells = []
        for tree in trees:
            seconds = best[tree, row]
            per = f"{seconds / len(deltas) * 1e6:7.1f} µs/delta" if row in MODES else " " * 15
            cells.append(f"{tree}: {per} {seconds * 1e3 / kb:6.2f} ms/KB")
        ratio = f"  this/against {best['this', row] / best['against', row]:.2f}" if args.against else ""
        print(f"{row:>14}  " + "   ".join(cells) + ratio)


if __name__ == "__main__":
    main()
