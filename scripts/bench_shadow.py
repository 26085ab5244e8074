"""What shadow traffic costs the primary: its p95 with `--shadow` on against the same server without.

Two real `lmctl serve` child processes on the same model directory, dtype and thread count:
one plain, one with `--shadow` (a second copy of the model, loaded beside the primary, that
gets a copy of every sampled request after the primary answered). C closed-loop clients
(`--clients`, 8) send greedy /v1/completions; rounds alternate between the two servers
(`--repeats` each, the order flipped every repeat), and after each shadowed round the script
waits until the shadow has no copy in flight, so no round pays for another's shadow work.
Prints p50/p95 of each, the ratio shadowed/plain p95 (goal: <= 1.10) and the shadow report
(copies done, skipped under load, greedy agreement). The tiny test Llama is overhead-bound:
what it measures is the shadow's competition for the CPU and the GIL, not matmul time.

    python scripts/bench_shadow.py [--model tiny|PATH] [--clients 8] [--requests 160] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
from bench_serve import http_client, run_level  # noqa: E402
from http_wait import wait_for_http  # noqa: E402
from load_test import _tiny_model  # noqa: E402


def start(model: str, port: int, work: Path, extra: list[str], threads: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "LMCTL_HOME": str(work / "lmctl-home"), "PYTHONPATH": str(REPO), "LMCTL_API_KEYS": ""}
    cmd = [sys.executable, "-m", "lmctl", "serve", model, "--port", str(port), *extra]
    log = (work / f"serve-{port}.log").open("w")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def shadow_idle(url: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        report = httpx.get(f"{url}/v1/shadow").json()
        if report["in_flight"] == 0 or time.monotonic() > deadline:
            return dict(report)
        time.sleep(0.05)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny (the test Llama built from config) or a model directory")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=160, help="requests per round")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per server, interleaved")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--shadow-rate", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each server")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = str(_tiny_model(work)) if args.model == "tiny" else args.model
        ports = {"plain": 8931, "shadow": 8932}
        procs = {"plain": start(model, ports["plain"], work, [], args.threads),
                 "shadow": start(model, ports["shadow"], work, ["--shadow", model, "--shadow-rate",
                                                                 str(args.shadow_rate)], args.threads)}
        try:
            return run(args, model, ports)
        finally:
            for proc in procs.values():
                proc.terminate()
                proc.wait(timeout=60)


def run(args: argparse.Namespace, model: str, ports: dict[str, int]) -> int:
    urls = {kind: f"http://127.0.0.1:{port}" for kind, port in ports.items()}
    for url in urls.values():
        wait_for_http(f"{url}/readyz", timeout=300)
    name = httpx.get(f"{urls['plain']}/v1/models").json()["data"][0]["id"]
    prompts = [f"The model number {i} says" for i in range(args.requests)]
    latencies: dict[str, list[float]] = {"plain": [], "shadow": []}
    for kind in ("plain", "shadow"):  # warm-up, not counted
        run_level(http_client(urls[kind], name, args.max_tokens), prompts[:16], args.clients, 16, count=lambda o: o[1])
    shadow_idle(urls["shadow"])
    for repeat in range(args.repeats):
        for kind in (("plain", "shadow") if repeat % 2 == 0 else ("shadow", "plain")):
            level = run_level(timed(http_client(urls[kind], name, args.max_tokens), latencies[kind]), prompts,
                              args.clients, args.requests, count=lambda o: o[1])
            if kind == "shadow":
                shadow_idle(urls["shadow"])
            print(f"round {repeat + 1} {kind:6s}: p50 {level['p50_s'] * 1000:7.1f} ms  p95 {level['p95_s'] * 1000:7.1f} ms"
                  f"  {level['req_s']:6.1f} req/s", flush=True)
    p95 = {k: statistics.quantiles(v, n=20, method="inclusive")[18] for k, v in latencies.items()}
    p50 = {k: statistics.median(v) for k, v in latencies.items()}
    ratio = p95["shadow"] / p95["plain"]
    print(f"\n{args.clients} clients, {args.requests} requests x {args.repeats} rounds each, max_tokens "
          f"{args.max_tokens}, model {model}")
    for kind in ("plain", "shadow"):
        print(f"  {kind:6s}: p50 {p50[kind] * 1000:7.1f} ms  p95 {p95[kind] * 1000:7.1f} ms")
    print(f"  p95 shadowed / plain: {ratio:.3f} (goal <= 1.10: {'met' if ratio <= 1.10 else 'MISSED'})")
    report = shadow_idle(urls["shadow"])
    print("  shadow report: " + json.dumps({k: report[k] for k in ("requests", "compared", "agreement",
                                                                    "latency_ms")}))
    return 0


def timed(complete: Any, into: list[float]) -> Any:
    def call(prompt: str) -> Any:
        started = time.perf_counter()
        out = complete(prompt)
        into.append(time.perf_counter() - started)
        return out

    return call


if __name__ == "__main__":
    raise SystemExit(main())
