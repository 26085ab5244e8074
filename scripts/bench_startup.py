"""`lmctl --help` against importing what any typer CLI of its kind imports (issue 21 item 10).

Runs, alternately and `--repeats` times each, the console script with `--help` and
`python -c "import typer, rich, pydantic, yaml"`, and prints the median wall times and their
ratio (target: under 2.5x), then the lmctl modules `--help` imported with their own import
time (`-X importtime`, one extra run). Alternating keeps a busy machine's load from favouring
either side.

    python scripts/bench_startup.py [--repeats 21]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BASELINE = [sys.executable, "-c", "import typer, rich, pydantic, yaml"]


def _wall(cmd: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def _own_imports(cmd: list[str]) -> list[tuple[int, str]]:
    """(self microseconds, module) of every lmctl module the command imports, slowest first."""
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    err = subprocess.run(cmd, capture_output=True, text=True, env=env).stderr
    rows = [re.match(r"import time:\s+(\d+) \|\s+\d+ \|\s+(\S+)", line) for line in err.splitlines()]
    return sorted(((int(m[1]), m[2]) for m in rows if m and m[2].startswith("lmctl")), reverse=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args()
    script = shutil.which("lmctl", path=str(Path(sys.executable).parent)) or "lmctl"
    help_cmd = [script, "--help"]
    _wall(help_cmd), _wall(BASELINE)  # warm the page cache for both
    times: dict[str, list[float]] = {"lmctl --help": [], "import typer, rich, pydantic, yaml": []}
    for _ in range(args.repeats):
        times["lmctl --help"].append(_wall(help_cmd))
        times["import typer, rich, pydantic, yaml"].append(_wall(BASELINE))
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    for name, median in medians.items():
        print(f"{name:40s} median {median * 1000:7.1f} ms  (min {min(times[name]) * 1000:.1f} ms)")
    ratio = medians["lmctl --help"] / medians["import typer, rich, pydantic, yaml"]
    print(f"ratio {ratio:.2f}x (target < 2.5x): {'met' if ratio < 2.5 else 'MISSED'}")
    print("lmctl modules imported by --help (own import time):")
    for micros, module in _own_imports(help_cmd)[:12]:
        print(f"  {micros / 1000:6.1f} ms  {module}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
