"""Load and fault test of `lmctl serve` over loopback HTTP.

Starts a real server (the tiny test model built from config unless --model is given), sends
a bounded number of requests from N concurrent clients, mixing plain, streaming, chat and a
few deliberately bad requests, then prints latency percentiles, throughput, status counts and
the server's memory (RSS) before, during and after. Exit 1 on any 5xx or on RSS growth over
--max-rss-growth-mb, so it can gate a CI job.

    python scripts/load_test.py                      # 2000 requests, 32 clients, tiny model
    python scripts/load_test.py --model models:/NAME@production --requests 200
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil

from http_wait import wait_for_http

from lmctl.stats import percentiles

REPO = Path(__file__).resolve().parent.parent


def _tiny_model(directory: Path) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import build_tiny_model  # the same tiny Llama the tests use

    return build_tiny_model(directory / "tiny")


def _start(model: str, port: int, args: argparse.Namespace) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "lmctl", "serve", model, "--port", str(port), "--max-batch-size", str(args.batch),
           "--max-queue", str(args.queue), "--request-timeout", "60"]
    return subprocess.Popen(cmd, stderr=subprocess.DEVNULL, env={**os.environ, "LMCTL_API_KEYS": ""})


def _request(rng: random.Random) -> tuple[str, dict[str, object]]:
    """A mix: mostly completions, some chat and streaming, 2% invalid (must be 4xx, never 5xx)."""
    roll = rng.random()
    sampling = {"max_tokens": rng.randint(1, 16), "temperature": rng.choice([0.0, 0.7, 1.0])}
    if roll < 0.02:
        return "/v1/completions", {"prompt": "x", "max_tokens": 0}
    if roll < 0.25:
        return "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello there"}], **sampling,
                                        "stream": rng.random() < 0.5}
    return "/v1/completions", {"prompt": rng.choice(["The model", "A tokenizer", "Data"]) * rng.randint(1, 4),
                               **sampling, "stream": rng.random() < 0.2}


async def _client(url: str, jobs: asyncio.Queue[int], results: list[tuple[int, float]], seed: int) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        while True:
            try:
                jobs.get_nowait()
            except asyncio.QueueEmpty:
                return
            path, body = _request(rng)
            start = time.perf_counter()
            try:
                response = await client.post(path, json=body)
                await response.aread()
                results.append((response.status_code, time.perf_counter() - start))
            except httpx.HTTPError:
                results.append((599, time.perf_counter() - start))  # connection-level failure


async def _load(url: str, requests: int, clients: int, rss: list[float], pid: int) -> tuple[list[tuple[int, float]], float]:
    jobs: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        jobs.put_nowait(i)
    results: list[tuple[int, float]] = []
    proc = psutil.Process(pid)

    async def sample_memory() -> None:
        while True:
            rss.append(proc.memory_info().rss / 2**20)
            await asyncio.sleep(0.5)

    sampler = asyncio.create_task(sample_memory())
    start = time.perf_counter()
    await asyncio.gather(*[_client(url, jobs, results, seed) for seed in range(clients)])
    elapsed = time.perf_counter() - start
    sampler.cancel()
    return results, elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="MODEL_REF to serve (default: tiny model built from config)")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--queue", type=int, default=64)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--max-rss-growth-mb", type=float, default=200.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(_tiny_model(Path(tmp)))
        url = f"http://127.0.0.1:{args.port}"
        server = _start(model, args.port, args)
        try:
            wait_for_http(f"{url}/readyz", timeout=300, proc=server)
            warm = psutil.Process(server.pid).memory_info().rss / 2**20
            rss: list[float] = []
            results, elapsed = asyncio.run(_load(url, args.requests, args.clients, rss, server.pid))
            after = psutil.Process(server.pid).memory_info().rss / 2**20
        finally:
            server.terminate()
            server.wait(timeout=60)
    codes = Counter(code for code, _ in results)
    ok = [seconds for code, seconds in results if code == 200]
    server_errors = sum(n for code, n in codes.items() if code >= 500)
    print(f"requests {len(results)}  clients {args.clients}  batch {args.batch}  elapsed {elapsed:.1f} s")
    print(f"status   {dict(sorted(codes.items()))}  5xx {server_errors}")
    if ok:  # the percentiles every lmctl report uses (lmctl.stats), so these agree with eval --latency's
        p50, p95, p99 = (seconds * 1000 for seconds in percentiles(ok, (0.50, 0.95, 0.99)))
        print(f"latency  p50 {p50:.0f} ms  p95 {p95:.0f} ms  p99 {p99:.0f} ms  mean {statistics.mean(ok) * 1000:.0f} ms")
    else:
        print("latency  no request succeeded")
    print(f"throughput {len(results) / elapsed:.1f} req/s")
    print(f"server RSS  warm {warm:.0f} MiB  peak {max(rss, default=warm):.0f} MiB  after {after:.0f} MiB  "
          f"growth {after - warm:+.0f} MiB")
    return 1 if server_errors or after - warm > args.max_rss_growth_mb else 0


if __name__ == "__main__":
    raise SystemExit(main())
