"""Benchmark the batching engine against one-request-at-a-time generation, in one process.

(a) baseline: a plain lock around `model.generate`, as the one-at-a-time server does;
(b) engine:   `lmctl.serve.engine.Engine` (dynamic batching with a KV cache).

Closed-loop load: C client threads send `--requests` greedy requests per level (at least one
per client), each sending its next as soon as its last returned, at C = 1, 8, 32
(`--clients`). For each level the baseline and the engine run interleaved in the same
process, on the same model and prompts. Prints completion tokens/s, requests/s and p50/p95
request latency (submit -> last token), the ratios engine/baseline, and whether the
greedy outputs agree token for token. Goal: >= 2x throughput at 8 clients.

Models: `--model tiny` (default; the 2-layer test Llama, overhead-bound), `--model synthetic`
(a random-weight Llama sized by --synthetic-layers/--synthetic-hidden/--synthetic-vocab, so
the numbers reflect real matmul work), or a model directory / pulled name (smollm2-135m).
CPU timings on a shared machine are noisy: compare ratios, not absolute numbers. Both modes
run with the same torch thread count (`--threads`, default 1; see its help).

    python scripts/bench_serve.py [--model tiny|synthetic|PATH] [--clients 1,8,32] [--max-tokens 32]

`--servers lmctl,transformers` instead compares real servers over HTTP (peers, issue 16):
`lmctl serve` with its default settings and `transformers serve --continuous-batching`,
each a child process on the same model directory, dtype (float32) and thread count
(OMP_NUM_THREADS), driven by the same closed-loop clients with the same text prompts
(/v1/completions, temperature 0), levels interleaved and the order alternated. The greedy
texts are compared with in-process `generate` one request at a time, which is also the
one-at-a-time row. Goal: lmctl >= 1.2x transformers' tokens/s at 8 and 32 clients, p95 no
worse, outputs identical.

A server named `lmctl:MODE` is `lmctl serve --output-guard MODE` (issue 27): e.g.
`--servers lmctl:off,lmctl:flag,lmctl:redact` prints each guard mode's tokens/s and p95 against
`off`, the guard's cost (its text has no findings, so every mode sends the same text).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from http_wait import wait_for_http  # noqa: E402
from lmctl.serve.engine import Engine, SamplingParams  # noqa: E402

Generate = Callable[[list[int]], list[int]]


def load_model(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """(model, tokenizer or a stub with pad/eos ids, description)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.model == "synthetic":
        heads = max(1, args.synthetic_hidden // 64)
        config = LlamaConfig(vocab_size=args.synthetic_vocab, hidden_size=args.synthetic_hidden,
                             intermediate_size=args.synthetic_hidden * 8 // 3, num_hidden_layers=args.synthetic_layers,
                             num_attention_heads=heads, num_key_value_heads=max(1, heads // 3),
                             max_position_embeddings=4096, tie_word_embeddings=True)
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
        return model, SimpleNamespace(pad_token_id=0, eos_token_id=None), (
            f"synthetic Llama {args.synthetic_layers}x{args.synthetic_hidden}, vocab {args.synthetic_vocab}")
    from lmctl.loading import load_base_model, load_tokenizer
    from lmctl.modelref import resolve_base

    if args.model == "tiny":
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import build_tiny_model

        path = str(build_tiny_model(Path(tempfile.mkdtemp(prefix="bench-serve-"))))
    else:
        path = resolve_base(args.model)
    model = load_base_model(path, "float32").eval()
    return model, load_tokenizer(path), f"{args.model} ({path})"


def make_prompts(tok: Any, vocab: int, n: int, max_len: int) -> list[list[int]]:
    """n prompts of varied length (max_len/2..max_len): real text when there is a tokenizer."""
    rng = random.Random(0)
    lengths = [rng.randint(max(1, max_len // 2), max_len) for _ in range(n)]
    if not hasattr(tok, "encode"):
        return [[rng.randrange(1, vocab) for _ in range(k)] for k in lengths]
    texts = [json.loads(line)["text"] for line in (REPO / "tests/assets/tiny_train.jsonl").read_text().splitlines()]
    ids = tok(" ".join(texts), add_special_tokens=False)["input_ids"]
    return [ids[(s := rng.randrange(0, len(ids) - k)): s + k] for k in lengths]


def baseline(model: Any, tok: Any, max_tokens: int) -> Generate:
    lock = threading.Lock()
    eos = getattr(tok, "eos_token_id", None)

    def generate(ids: list[int]) -> list[int]:
        x = torch.tensor([ids], device=model.device)  # a CUDA model given CPU ids warns and crawls
        with lock, torch.inference_mode():
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=eos)
        new = out[0, len(ids):].tolist()
        return new[: new.index(eos)] if eos in new else new

    return generate


def engine_client(engine: Engine, tok: Any, max_tokens: int) -> Generate:
    eos = getattr(tok, "eos_token_id", None)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, stop_token_ids=frozenset({eos} - {None}))
    return lambda ids: engine.submit(ids, params).wait(600).token_ids


def run_level(generate: Callable[[Any], Any], prompts: list[Any], clients: int, total: int,
              count: Callable[[Any], int] = len) -> dict[str, Any]:
    """Closed loop: C threads take request numbers 0..total-1 in turn, each sending its next
    request as soon as the last one returned; request i always carries prompt i."""
    latencies: list[float] = []
    outputs: dict[int, list[int]] = {}
    lock = threading.Lock()
    counter = iter(range(total))

    def client(c: int) -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t0 = time.perf_counter()
            out = generate(prompts[i % len(prompts)])
            with lock:
                latencies.append(time.perf_counter() - t0)
                outputs[i] = out

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    tokens = sum(count(o) for o in outputs.values())
    q = statistics.quantiles(latencies, n=20, method="inclusive") if len(latencies) > 1 else latencies * 19
    return {"wall_s": wall, "req_s": len(latencies) / wall, "tok_s": tokens / wall,
            "p50_s": statistics.median(latencies), "p95_s": q[18], "outputs": outputs}


def _start_server(kind: str, path: str, port: int, threads: int, log: Path) -> Any:
    import os
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "LMCTL_HOME": str(log.parent / "lmctl-home"), "PYTHONPATH": str(REPO)}
    if kind.startswith("lmctl"):  # lmctl:MODE: with --output-guard MODE
        guard = ["--output-guard", kind.split(":")[1]] if ":" in kind else []
        cmd = [sys.executable, "-m", "lmctl", "serve", path, "--port", str(port), *guard]
    else:
        cmd = [str(Path(sys.executable).parent / "transformers"), "serve", path, "--continuous-batching",
               "--device", "cpu", "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port)]
    return subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def http_client(url: str, model: str, max_tokens: int) -> Callable[[str], Any]:
    import httpx

    local = threading.local()

    def complete(prompt: str) -> tuple[str, int]:
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=900)
        r = local.client.post(url + "/v1/completions", json={"model": model, "prompt": prompt,
                                                              "max_tokens": max_tokens, "temperature": 0})
        r.raise_for_status()
        body = r.json()
        return body["choices"][0]["text"], int(body["usage"]["completion_tokens"])

    return complete


def compare_servers(args: argparse.Namespace, levels: list[int]) -> int:
    """lmctl serve vs transformers serve over HTTP, plus one-at-a-time generate (in process)."""
    from lmctl.loading import load_base_model, load_tokenizer
    from lmctl.modelref import resolve_base

    path = resolve_base(args.model)
    tok = load_tokenizer(path)
    model = load_base_model(path, "float32").eval()
    totals = {c: max(args.requests, c) for c in levels}
    texts = [tok.decode(ids) for ids in make_prompts(tok, 0, max(totals.values()), args.prompt_tokens)]
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-peers-"))
    names = [s.strip() for s in args.servers.split(",")]
    servers, clients = {}, {}
    for i, name in enumerate(names):
        port = 18700 + i
        servers[name] = _start_server(name, path, port, args.threads, tmp / f"{name.replace(':', '-')}.log")
        model_id = Path(path).name if name.startswith("lmctl") else path
        clients[name] = http_client(f"http://127.0.0.1:{port}", model_id, args.max_tokens)
    try:
        for i, name in enumerate(names):
            wait_for_http(f"http://127.0.0.1:{18700 + i}" + ("/readyz" if name.startswith("lmctl") else "/health"),
                          timeout=600, proc=servers[name], log=tmp / f"{name.replace(':', '-')}.log")
        return _run_peers(args, levels, totals, texts, tok, model, clients)
    finally:
        for proc in servers.values():
            proc.terminate()
            proc.wait(60)
        print(f"server logs: {tmp}", file=sys.stderr)


def _run_peers(args: argparse.Namespace, levels: list[int], totals: dict[int, int], texts: list[str], tok: Any,
               model: Any, clients: dict[str, Callable[[str], Any]]) -> int:
    import os

    gen = baseline(model, tok, args.max_tokens)
    one = lambda text: (lambda ids: (tok.decode(ids), len(ids)))(gen(tok(text)["input_ids"]))  # noqa: E731
    for complete in clients.values():  # warm-up: first-request allocations stay out of the numbers
        run_level(complete, texts, 2, 2, count=lambda out: out[1])
    reference = run_level(one, texts, 1, max(totals.values()), count=lambda out: out[1])
    print(f"model {args.model}; max_tokens {args.max_tokens}; threads {args.threads}; load average "
          f"{os.getloadavg()[0]:.1f}\n{'clients':>7} {'server':<13} {'req/s':>8} {'tok/s':>9} {'p50 s':>8} {'p95 s':>8}")
    r = reference
    print(f"{'any':>7} {'one-at-a-time':<13} {r['req_s']:>8.2f} {r['tok_s']:>9.1f} {r['p50_s']:>8.3f} {r['p95_s']:>8.3f}")
    summary, same, compared, guards = [], 0, 0, []
    for clients_n in levels:
        results = {}
        order = list(clients) if clients_n % 2 else list(clients)[::-1]
        for name in order:
            results[name] = run_level(clients[name], texts, clients_n, totals[clients_n], count=lambda out: out[1])
        for name, r in results.items():
            print(f"{clients_n:>7} {name:<13} {r['req_s']:>8.2f} {r['tok_s']:>9.1f} {r['p50_s']:>8.3f} {r['p95_s']:>8.3f}")
            for i, out in r["outputs"].items():
                compared += 1
                same += out[0] == reference["outputs"][i][0]
        if "lmctl" in results and "transformers" in results:
            a, b = results["lmctl"], results["transformers"]
            summary.append((clients_n, a["tok_s"] / b["tok_s"], a["p95_s"] / b["p95_s"],
                            a["tok_s"] / reference["tok_s"]))
        if "lmctl:off" in results:
            off = results["lmctl:off"]
            for name in (n for n in results if n.startswith("lmctl:") and n != "lmctl:off"):
                r = results[name]
                guards.append(f"  {clients_n:>2} clients: {name}: throughput {r['tok_s'] / off['tok_s']:.2f}x, "
                              f"p95 latency {r['p95_s'] / off['p95_s']:.2f}x of lmctl:off")
    print(f"load average at the end {os.getloadavg()[0]:.1f}\nlmctl / transformers serve:")
    for c, thr, p95, vs_one in summary:
        goal = "  (goal >= 1.2x, p95 <= 1x)" if c in (8, 32) else ""
        print(f"  {c:>2} clients: throughput {thr:.2f}x, p95 latency {p95:.2f}x; vs one-at-a-time {vs_one:.2f}x{goal}")
    if guards:
        print("output guard modes / off:\n" + "\n".join(guards))
    print(f"greedy outputs identical to generate: {same}/{compared}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny | synthetic | model dir or pulled name (smollm2-135m)")
    parser.add_argument("--synthetic-layers", type=int, default=8)
    parser.add_argument("--synthetic-hidden", type=int, default=512)
    parser.add_argument("--synthetic-vocab", type=int, default=16384)
    parser.add_argument("--clients", default="1,8,32", help="comma-separated concurrency levels")
    parser.add_argument("--requests", type=int, default=16, help="requests per level (at least one per client)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=48, help="longest prompt; others are 1/2..1x this")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--servers", help="compare real servers over HTTP instead: lmctl,transformers")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads for both modes; 0 = torch default. Default 1: on a shared, "
                             "oversubscribed CPU, OpenMP barriers between threads swamp small ops and the run "
                             "measures the neighbours instead of the code")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    levels = [int(c) for c in args.clients.split(",")]
    if args.servers:
        return compare_servers(args, levels)
    model, tok, desc = load_model(args)
    vocab = model.get_input_embeddings().num_embeddings
    totals = {c: max(args.requests, c) for c in levels}
    prompts = make_prompts(tok, vocab, max(totals.values()), args.prompt_tokens)
    engine = Engine(model, tok, max_batch_size=args.max_batch_size, max_queue=max(64, max(levels) * 2))
    engine.start()
    modes = {"baseline": baseline(model, tok, args.max_tokens), "engine": engine_client(engine, tok, args.max_tokens)}
    for generate in modes.values():  # warm-up: first-call allocations and lazy init stay out of the numbers
        run_level(generate, prompts, 2, 2)
    print(f"model: {desc}; max_tokens {args.max_tokens}, prompts {args.prompt_tokens // 2}-{args.prompt_tokens} "
          f"tokens, {args.requests} requests per level (>= 1 per client), engine max_batch_size {args.max_batch_size}, "
          f"torch threads {torch.get_num_threads()}", file=sys.stderr)
    header = f"{'clients':>7} {'mode':<9} {'req/s':>8} {'tok/s':>9} {'p50 s':>8} {'p95 s':>8}"
    print(header)
    ratios, mismatches, compared = [], 0, 0
    for clients in levels:
        results = {}
        order = ["baseline", "engine"] if clients % 2 else ["engine", "baseline"]  # alternate who goes first
        for name in order:
            results[name] = run_level(modes[name], prompts, clients, totals[clients])
        for name in ("baseline", "engine"):
            r = results[name]
            print(f"{clients:>7} {name:<9} {r['req_s']:>8.2f} {r['tok_s']:>9.1f} {r['p50_s']:>8.3f} {r['p95_s']:>8.3f}")
        a, b = results["baseline"], results["engine"]
        ratios.append((clients, b["tok_s"] / a["tok_s"], b["p95_s"] / a["p95_s"]))
        for i, out in a["outputs"].items():
            compared += 1
            mismatches += out != b["outputs"][i]
    engine.stop()
    print("\nengine / baseline:")
    for clients, thr, p95 in ratios:
        goal = "  (goal >= 2x)" if clients == 8 else ""
        print(f"  {clients:>2} clients: throughput {thr:.2f}x, p95 latency {p95:.2f}x{goal}")
    print(f"greedy outputs identical: {compared - mismatches}/{compared}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
