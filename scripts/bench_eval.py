"""Benchmark lmctl's perplexity against lm-eval-harness on the same documents, in one run.

Each configuration runs in its own child process (so its peak RSS is its own), back to
back and alternating order between repeats, on the same model loaded the same way and the
same torch thread count:

- lmctl: `lmctl.evaluate.perplexity` with its default (memory-budget) batch size;
- lm-eval 0.4.13 `HFLM` on the same model object, at each `--peer-batches` size:
  `rolling` through its own `loglikelihood_rolling`; `strided` as `loglikelihood` requests
  whose context/continuation are exactly lmctl's windows (lm-eval has no strided mode).

Prints compute seconds, peak RSS, ratios against lm-eval's best batch setting, and the
per-document NLL difference (must be <= 1e-6 relative). Targets (issue 16): peak RSS <=
lm-eval batch 1's; strided >= 1.3x faster than lm-eval's best, rolling >= 1.0x.

    python scripts/bench_eval.py [--model smollm2-135m] [--max-length 1024] [--tokens 30000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

print = __import__("functools").partial(print, flush=True)  # noqa: A001 - progress shows through pipes

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def documents(tokenizer: Any, tokens: int) -> list[str]:
    """Whole Python-reference topics (shipped with Python), in name order, until `tokens`."""
    from demo_corpus import split_topics

    texts, total = [], 0
    for text in split_topics()[0]:
        texts.append(text)
        total += len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if total >= tokens:
            break
    return texts


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _lm_eval(model: Any, tokenizer: Any, texts: list[str], method: str, length: int, stride: int,
             batch: int, device: str = "cpu") -> list[float]:
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from lmctl.evaluate.perplexity import make_windows

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch, max_length=length, device=device)
    if method == "rolling":
        requests = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
        return [-x for x in lm.loglikelihood_rolling(requests, disable_tqdm=True)]
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    owners, requests = [], []
    for doc, text in enumerate(texts):
        for w in make_windows(doc, tokenizer(text, add_special_tokens=False)["input_ids"], prefix, length, stride):
            context = w.input_ids[: w.score_from + 1]  # lm-eval scores the continuation after it
            owners.append(doc)
            requests.append(((None, None), context, w.targets))
    nll = [0.0] * len(texts)
    for doc, (logprob, _) in zip(owners, lm._loglikelihood_tokens(requests, disable_tqdm=True)):
        nll[doc] -= logprob
    return nll


def child(spec: dict[str, Any]) -> None:
    import torch

    from lmctl.evaluate.perplexity import perplexity
    from lmctl.loading import load_base_model, load_tokenizer

    torch.set_num_threads(spec["threads"])
    tokenizer, model = load_tokenizer(spec["path"]), load_base_model(spec["path"], "float32").eval()
    texts = json.loads(Path(spec["docs"]).read_text())
    loaded_mb = _rss_mb()
    length, stride = spec["max_length"], spec["stride"]
    started = time.perf_counter()
    if spec["side"] == "lmctl":
        scored = perplexity(model, tokenizer, texts, length, stride)
        nll, batch = scored.doc_nll, scored.batch_size
    else:
        nll, batch = _lm_eval(model, tokenizer, texts, spec["method"], length, stride, spec["batch"]), spec["batch"]
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "peak_mb": _rss_mb(), "loaded_mb": loaded_mb, "batch": batch, "nll": nll}))


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                         env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"})
    if out.returncode != 0:
        raise SystemExit(f"child {spec['side']} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(args: argparse.Namespace, path: str, docs: Path, method: str) -> dict[str, list[dict[str, Any]]]:
    length = args.max_length
    stride = length if method == "rolling" else length // 2
    sides = [("lmctl", None)] + [("lm-eval", b) for b in args.peer_batches]
    runs: dict[str, list[dict[str, Any]]] = {}
    for rep in range(args.repeats):
        for side, batch in sides if rep % 2 == 0 else sides[::-1]:  # alternate who goes first
            spec = {"side": side, "batch": batch, "method": method, "max_length": length, "stride": stride,
                    "path": path, "docs": str(docs), "threads": args.threads}
            runs.setdefault(f"{side} b{batch}" if batch else side, []).append(run_child(spec))
    return runs


def report(method: str, runs: dict[str, list[dict[str, Any]]]) -> bool:
    seconds = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
    peak = {k: max(r["peak_mb"] for r in v) for k, v in runs.items()}
    ours = runs["lmctl"][0]
    peers = [k for k in runs if k != "lmctl"]
    best = min(peers, key=lambda k: seconds[k])
    worst_rel = 0.0
    for k in peers:
        for a, b in zip(ours["nll"], runs[k][0]["nll"]):
            worst_rel = max(worst_rel, abs(a - b) / max(abs(b), 1e-12))
    print(f"\n{method}: {'run':14} {'batch':>5} {'seconds':>8} {'peak RSS MB':>12} {'model loaded MB':>16}")
    for k in runs:
        r = runs[k][0]
        print(f"{'':{len(method) + 2}}{k:14} {r['batch']:>5} {seconds[k]:8.1f} {peak[k]:12.0f} {r['loaded_mb']:16.0f}")
    speed = seconds[best] / seconds["lmctl"]
    goal = 1.3 if method == "strided" else 1.0
    b1 = "lm-eval b1" if "lm-eval b1" in peak else best
    rss_ok = peak["lmctl"] <= peak[b1]
    print(f"  speed vs lm-eval's best ({best}): {speed:.2f}x (goal >= {goal}x) {'met' if speed >= goal else 'MISSED'}")
    print(f"  peak RSS vs {b1}: {peak['lmctl'] / peak[b1]:.2f}x (goal <= 1) {'met' if rss_ok else 'MISSED'}")
    print(f"  per-document NLL, worst relative difference: {worst_rel:.1e} (goal <= 1e-6) "
          f"{'met' if worst_rel <= 1e-6 else 'MISSED'}")
    return worst_rel <= 1e-6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="model directory or pulled name")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=30000, help="documents are added until this many tokens")
    parser.add_argument("--methods", default="strided,rolling")
    parser.add_argument("--peer-batches", default="1,8", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--threads", type=int, default=1, help="torch threads, the same for every run (1: on a shared, oversubscribed CPU, OpenMP barriers between threads measure the neighbours)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per configuration; the median is reported")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return 0
    os.environ.setdefault("LMCTL_HOME", str(Path(tempfile.mkdtemp()) / "home"))
    from lmctl.loading import load_tokenizer
    from lmctl.modelref import resolve_base

    path = resolve_base(args.model)
    texts = documents(load_tokenizer(path), args.tokens)
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        docs = Path(tmp) / "docs.json"
        docs.write_text(json.dumps(texts))
        print(f"model {args.model}, {len(texts)} documents, >= {args.tokens} tokens, max_length {args.max_length}, "
              f"torch threads {args.threads}, load average {os.getloadavg()[0]:.1f}")
        agree = [report(m, measure(args, path, docs, m)) for m in args.methods.split(",")]
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    return 0 if all(agree) else 1


if __name__ == "__main__":
    raise SystemExit(main())
