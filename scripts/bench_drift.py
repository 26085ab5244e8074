"""False alarms and detections of `lmctl drift`'s checks at default settings (issue 26).

Two real corpora, each cut into documents of about 600 characters on paragraph boundaries:

- demo: the Python language reference every Python ships (`pydoc_data.topics`, the corpus
  `make demo` trains on, see scripts/demo_corpus.py);
- docstrings: the docstrings of the standard library's public modules, classes and functions.

Same-distribution trials draw 2 x N documents of one corpus at random and split them into
reference and current. Shift trials draw N reference documents and N current ones from:

- language: German, the translated messages (msgstr) of the Debian gettext catalogs in
  /usr/share/locale/de/LC_MESSAGES (coreutils, apt, bash...), in the same ~600-character documents;
- topic: software licences (/usr/share/common-licenses: GPL, Apache, MPL...), legal English;
- noise: held-out documents of the same corpus with 5% of their characters replaced by random
  printable ASCII (OCR or encoding damage);
- spam: templated spam messages ("Buy cheap {item} now..."), filled at random.

Tokens come from the model's tokenizer exactly as `lmctl drift` gets them (`load_for_inference`,
`add_special_tokens=False`), SmolLM2-135M's by default (`lmctl models pull smollm2-135m`). The
perplexity check needs the model's NLL on every document, minutes of CPU per thousand documents
for SmolLM2, so it is off here (`--perplexity` turns it on, scored once per document); the other
four checks run through `lmctl.monitor.drift.assess` at default settings (Holm over those four).

    python scripts/bench_drift.py [--model DIR] [--trials 50] [--sizes 20,50,100,200] [--perplexity]
"""

from __future__ import annotations

import argparse
import gettext
import inspect
import random
import re
import string
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from lmctl.config import DriftConfig
from lmctl.monitor.drift import Assessment, Scored, assess

CHUNK = 600
SHIFTS = ("language", "topic", "noise", "spam")
STDLIB = ("argparse", "asyncio", "collections", "csv", "datetime", "decimal", "email", "functools", "http.client",
          "inspect", "itertools", "json", "logging", "pathlib", "pickle", "re", "shutil", "socket", "sqlite3",
          "statistics", "string", "subprocess", "tarfile", "textwrap", "threading", "typing", "unittest",
          "urllib.parse", "uuid", "zipfile", "configparser", "difflib", "fractions", "heapq", "ipaddress",
          "optparse", "pprint", "random", "sched", "selectors", "smtplib", "tempfile", "tokenize", "traceback",
          "ast", "base64", "bisect", "calendar", "cmd", "codecs", "contextlib", "copy", "dataclasses", "dis",
          "doctest", "enum", "filecmp", "fnmatch", "ftplib", "getopt", "glob", "gzip", "hashlib", "imaplib",
          "locale", "mailbox", "mimetypes", "numbers", "operator", "os", "platform", "poplib", "queue", "shelve",
          "shlex", "socketserver", "ssl", "struct", "timeit", "trace", "weakref", "wave", "zipapp", "pdb",
          "multiprocessing.pool", "concurrent.futures", "xml.dom.minidom", "html.parser", "nntplib")


def chunks(text: str, size: int = CHUNK) -> list[str]:
    """Consecutive paragraphs (or lines) joined until a document reaches `size` characters."""
    docs, current = [], ""
    for part in re.split(r"\n\s*\n|\n", text):
        part = part.strip()
        if not part:
            continue
        current = f"{current}\n{part}" if current else part
        if len(current) >= size:
            docs.append(current[: 2 * size])
            current = ""
    if len(current) >= size // 3:
        docs.append(current)
    return docs


def demo_corpus() -> list[str]:
    from pydoc_data.topics import topics

    return [doc for name in sorted(topics) for doc in chunks(topics[name])]


def docstring_corpus() -> list[str]:
    import importlib

    texts = []
    for name in STDLIB:
        try:
            module = importlib.import_module(name)
        except ImportError:  # a module this Python was built without
            continue
        members = [module] + [obj for key, obj in sorted(vars(module).items()) if not key.startswith("_")
                              and (inspect.isclass(obj) or inspect.isfunction(obj))
                              and getattr(obj, "__module__", None) == module.__name__]
        texts += [doc for doc in (inspect.getdoc(m) for m in members) if doc and len(doc) >= 200]
    return [doc for text in dict.fromkeys(texts) for doc in chunks(text)]


def german_corpus() -> list[str]:
    messages = []
    for path in sorted(Path("/usr/share/locale/de/LC_MESSAGES").glob("*.mo")):
        try:
            with path.open("rb") as fh:
                catalog = gettext.GNUTranslations(fh)._catalog  # type: ignore[attr-defined]
        except (OSError, UnicodeDecodeError):  # a catalog in a legacy encoding
            continue
        messages += [v for k, v in sorted(catalog.items(), key=str) if k and isinstance(v, str) and len(v) > 20]
    return chunks("\n".join(messages))


def licence_corpus() -> list[str]:
    paths = sorted(p for p in Path("/usr/share/common-licenses").iterdir() if p.is_file())
    return [doc for p in paths for doc in chunks(p.read_text(encoding="utf-8", errors="replace"))]


def noisy(text: str, rng: random.Random, share: float = 0.05) -> str:
    chars = list(text)
    for i in rng.sample(range(len(chars)), int(share * len(chars))):
        chars[i] = rng.choice(string.printable[:94])
    return "".join(chars)


def spam(rng: random.Random, n: int) -> list[str]:
    items = ["watches", "pills", "crypto", "loans", "sneakers", "followers", "software licenses", "perfume"]
    lines = ["Buy cheap {item} now at {url} and save {pct}%!", "Limited offer: {item} from ${price}, today only.",
             "Click {url} to claim your free {item} - code {code}.", "Dear customer, your {item} order #{code} is "
             "waiting. Confirm at {url}.", "Best {item} prices online!!! Visit {url} - {pct}% OFF", "Unsubscribe: {url}"]
    docs = []
    for _ in range(n):
        fields = {"item": rng.choice(items), "url": f"http://{rng.choice(['deal', 'shop', 'win'])}{rng.randint(1, 99)}.biz",
                  "pct": rng.randint(10, 90), "price": rng.randint(5, 500), "code": rng.randint(10000, 99999)}
        docs.append(" ".join(rng.choice(lines).format(**fields) for _ in range(rng.randint(4, 12))))
    return docs


def scored(tokenizer: object, texts: list[str], nll: list[float] | None = None) -> list[Scored]:
    ids = [list(d) for d in tokenizer(texts, add_special_tokens=False)["input_ids"]]  # type: ignore[operator]
    return [Scored(nll=[nll[i] if nll else 0.0], ids=[doc]) for i, doc in enumerate(ids)]


def join(docs: list[Scored]) -> Scored:
    return Scored(nll=[d.nll[0] for d in docs], ids=[d.ids[0] for d in docs])


def doc_nll(loaded: object, texts: list[str]) -> list[float]:
    from lmctl.evaluate.perplexity import perplexity

    return list(perplexity(loaded.model, loaded.tokenizer, texts, 1024, 512, None).doc_nll)  # type: ignore[attr-defined]


def run(args: argparse.Namespace) -> None:
    from lmctl.loading import load_for_inference
    from lmctl.modelref import resolve

    rng = random.Random(0)
    loaded = load_for_inference(resolve(args.model))
    pools: dict[str, list[str]] = {"demo": demo_corpus(), "docstrings": docstring_corpus(),
                                   "language": german_corpus(), "topic": licence_corpus(), "spam": spam(rng, 400)}
    for corpus in ("demo", "docstrings"):
        pools[f"noise:{corpus}"] = [noisy(t, rng) for t in pools[corpus]]
    started = time.perf_counter()
    docs = {name: scored(loaded.tokenizer, texts, doc_nll(loaded, texts) if args.perplexity else None)
            for name, texts in pools.items()}
    print(f"model {args.model}; documents: " + ", ".join(f"{k} {len(v)}" for k, v in pools.items())
          + f"; tokenized{' and scored' if args.perplexity else ''} in {time.perf_counter() - started:.0f} s", flush=True)
    cfg = DriftConfig() if args.perplexity else DriftConfig(max_ppl_increase=None)
    table: dict[tuple[str, str, int], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for corpus in ("demo", "docstrings"):
        for size in args.sizes:
            for trial in range(args.trials):
                pick = np.random.default_rng([trial, size]).permutation(len(docs[corpus]))
                ref = [docs[corpus][i] for i in pick[:size]]
                held_out = pick[size:2 * size]
                currents = {"same": [docs[corpus][i] for i in held_out],
                            "noise": [docs[f"noise:{corpus}"][i] for i in held_out]}
                for shift in ("language", "topic", "spam"):
                    currents[shift] = [docs[shift][i] for i in
                                       np.random.default_rng([trial, size, 1]).permutation(len(docs[shift]))[:size]]
                for kind, cur in currents.items():
                    found = assess(cfg, join(ref), join(cur), loaded.tokenizer.unk_token_id)
                    row = table[(corpus, kind, size)]
                    row["trials"] += 1
                    row["drift"] += found.drift_detected
                    row["old rule"] += old_rule(found, cfg)
                    for check in found.checks:
                        row[check.name] += not check.passed
            print(f"  {corpus} n={size}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    report(table, cfg)


def old_rule(found: Assessment, cfg: DriftConfig) -> bool:
    """The decision before issue 26 (main 1ab8823), from the same numbers: fixed thresholds on the
    raw values, KS also needing p < 0.01, no correction (perplexity off, as here)."""
    t, lengths = found.tokens, found.token_length
    return bool(lengths.psi > (cfg.max_psi or np.inf) or t.rare_rate_increase_pp > (cfg.max_rare_rate_increase or np.inf)
                or t.unk_rate_increase_pp > (cfg.max_unk_rate_increase or np.inf)
                or (lengths.ks_statistic > (cfg.max_ks_statistic or np.inf) and lengths.ks_p_value < 0.01))


def report(table: dict[tuple[str, str, int], dict[str, int]], cfg: DriftConfig) -> None:
    names = sorted({k for row in table.values() for k in row} - {"trials", "drift", "old rule"})
    short = {n: n.replace("token length ", "").replace(" rate increase pp", "").replace(" statistic", "")
             for n in names}
    print(f"\nalpha {cfg.alpha}, correction {cfg.correction}, {cfg.permutations} permutations; "
          "share of trials that alarmed (same = false alarms, others = detections)\n")
    print("| corpus | current | docs per side | trials | old rule | drift | " + " | ".join(short[n] for n in names) + " |")
    print("|---|---|---|---|---|---|" + "---|" * len(names))
    for (corpus, kind, size), row in sorted(table.items(), key=lambda kv: (kv[0][0], kv[0][1] != "same", kv[0][1], kv[0][2])):
        n = row["trials"]
        cells = [f"{100 * row['old rule'] / n:.0f}%", f"{100 * row['drift'] / n:.0f}%"] + [f"{100 * row[name] / n:.0f}%" for name in names]
        print(f"| {corpus} | {kind} | {size} | {n} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model dir (default: the pulled smollm2-135m)")
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--sizes", default="20,50,100,200", help="documents per side, comma-separated")
    parser.add_argument("--perplexity", action="store_true", help="score every document with the model too (slow on CPU)")
    args = parser.parse_args()
    if args.model is None:
        from lmctl.home import models_dir

        args.model = str(models_dir() / "smollm2-135m")
    args.sizes = [int(s) for s in args.sizes.split(",")]
    run(args)


if __name__ == "__main__":
    main()
