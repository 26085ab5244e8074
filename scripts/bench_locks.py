"""What each lmctl lock operation adds, on the embedded store and on a team server.

    python scripts/bench_locks.py [--rounds N] [--team]   # --team: also a throwaway PostgreSQL + mlflow server

Per store, in one process, median milliseconds of: a bare MLflow alias move (the baseline),
the same move through `registry.move_alias` (alias lock + audit record), the local registry
file lock, the retrain lock (file lock embedded, server lock on a team server) and one
heartbeat. Ratios are against the bare alias move measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _median_ms(fn: Callable[[], object], rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples)


def measure(label: str, rounds: int) -> dict[str, float]:
    from lmctl import registry
    from lmctl import tracking
    from lmctl.registry import mutex
    from lmctl.retrain.lock import run_lock

    client = tracking.client()
    name = f"bench-{os.getpid()}-{label}"
    client.create_registered_model(name)
    exp = tracking.experiment_id(client, "lmctl-bench")
    for _ in range(2):  # a server accepts only a source inside the version's run
        run = client.create_run(exp)
        client.create_model_version(name, source=f"{run.info.artifact_uri}/m", run_id=run.info.run_id)
    flip = iter(["1", "2"] * rounds * 2)
    bare = _median_ms(lambda: client.set_registered_model_alias(name, "bench", next(flip)), rounds)
    moved = _median_ms(lambda: registry.move_alias(name, "production", next(flip)), rounds)

    def file_lock() -> None:
        with tracking.registry_lock():
            pass

    def retrain_lock() -> None:
        with run_lock(name):
            pass

    def heartbeat() -> None:
        client.set_registered_model_tag(mutex.RETRAIN_PREFIX + name, mutex.HEARTBEAT_TAG, f"{time.time():.3f}")

    results = {"bare alias move (baseline)": bare, "move_alias (alias lock + audit record)": moved,
               "registry file lock acquire+release": _median_ms(file_lock, rounds),
               "retrain lock acquire+release": _median_ms(retrain_lock, rounds)}
    with mutex.server_lock(client, mutex.RETRAIN_PREFIX + name, wait_s=0, what="bench"):
        results["one heartbeat"] = _median_ms(heartbeat, rounds)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--team", action="store_true", help="also measure on a throwaway team server")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    with tempfile.TemporaryDirectory(prefix="lmctl-bench-locks-") as tmp:
        os.chmod(tmp, 0o755)  # the PostgreSQL cluster's owner must reach it when run as root
        os.environ["LMCTL_HOME"] = str(Path(tmp) / "home")
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        tables = {"embedded (sqlite)": measure("embedded", args.rounds)}
        if args.team:
            import importlib.util

            spec = importlib.util.spec_from_file_location("team_server", Path(__file__).with_name("team_server.py"))
            assert spec and spec.loader
            team_server = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(team_server)
            info = team_server.start(Path(tmp) / "server")
            try:
                os.environ["MLFLOW_TRACKING_URI"] = str(info["tracking_uri"])
                tables["team server (PostgreSQL)"] = measure("team", args.rounds)
            finally:
                team_server.stop(Path(tmp) / "server")
    for store, results in tables.items():
        base = results["bare alias move (baseline)"]
        print(f"\n{store}, median of {args.rounds}:")
        for op, ms in results.items():
            print(f"  {op:<42} {ms:8.1f} ms  {ms / base:5.1f}x baseline")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
