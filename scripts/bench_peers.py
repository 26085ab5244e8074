"""lmctl against the tools its users would otherwise run, one command, one table (issue 16).

Runs, back to back on the same model and thread count, and prints each one's ratio lines
again at the end as the peer table:

- train: scripts/bench_train.py --trl (TRL SFTTrainer packing and padding-free, plain
  Trainer padded; validation loss from one common loop);
- eval: scripts/bench_eval.py (lm-eval-harness HFLM at batch 1 and 8, strided and rolling);
- serve: scripts/bench_serve.py --servers lmctl,transformers (`transformers serve
  --continuous-batching`, and one-at-a-time generate);
- start-up: `lmctl eval` on a 100-token file, whole process, against `python -c "import
  torch, transformers"` plus loading the same tokenizer and model (goal <= 1.5x).

Needs the `peers` extra (`pip install -c constraints.txt -e '.[dev,peers]'`) and a pulled
model (`lmctl models pull smollm2-135m`). CPU numbers on a shared machine are noisy: the
load average is printed with each part; compare ratios, not seconds.

    python scripts/bench_peers.py [--model smollm2-135m] [--only train,eval,serve,startup] [--quick]
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

HERE = Path(__file__).resolve().parent
# Lines of each part's output that carry a ratio or a verdict: they make the final table.
KEYS = ("speed", "peak RSS", "NLL", "throughput", "identical", "lmctl vs", "speed-up", "x ")


def run_part(name: str, cmd: list[str]) -> list[str]:
    print(f"\n== {name}: {' '.join(cmd[1:])} (load average {os.getloadavg()[0]:.1f})", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(HERE.parent)})
    print(proc.stdout, end="", flush=True)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return [f"FAILED (exit {proc.returncode})"]
    return [line.strip() for line in proc.stdout.splitlines() if any(k in line for k in KEYS)]


def startup(model: str, repeats: int) -> list[str]:
    """Whole-process seconds: `lmctl eval` on ~100 tokens vs import + load of the same model."""
    from pydoc_data.topics import topics

    sys.path.insert(0, str(HERE.parent))
    from lmctl.modelref import resolve_base

    path = resolve_base(model)
    tmp = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    data = tmp / "small.jsonl"
    data.write_text(json.dumps({"text": topics["for"][:450]}) + "\n")  # ~100 SmolLM2 tokens
    load = ("import torch, transformers\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"AutoTokenizer.from_pretrained({path!r}); AutoModelForCausalLM.from_pretrained({path!r}, dtype=torch.float32)")
    cmds = {"import torch, transformers + load": [sys.executable, "-c", load],
            "lmctl eval (100 tokens)": [sys.executable, "-m", "lmctl", "eval", path, "--data", str(data), "--json"]}
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "LMCTL_HOME": str(tmp / "home"), "HF_HUB_OFFLINE": "1"}
    times: dict[str, list[float]] = {k: [] for k in cmds}
    for rep in range(repeats):
        for name in cmds if rep % 2 == 0 else list(cmds)[::-1]:
            t0 = time.perf_counter()
            out = subprocess.run(cmds[name], capture_output=True, text=True, env=env, cwd=tmp)
            if out.returncode != 0:
                return [f"start-up: {name} failed: {out.stderr.strip().splitlines()[-1:]}"]
            times[name].append(time.perf_counter() - t0)
    print(f"\n== start-up (load average {os.getloadavg()[0]:.1f}), median of {repeats}")
    for name, ts in times.items():
        print(f"  {name:36} {statistics.median(ts):6.2f} s  (runs: {', '.join(f'{t:.1f}' for t in ts)})")
    a, b = (statistics.median(times[k]) for k in cmds)
    line = f"start-up: lmctl eval / (import torch, transformers + load) = {b / a:.2f}x (goal <= 1.5x)"
    print(line, flush=True)
    return [line]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--only", default="train,eval,serve,startup")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for every run")
    parser.add_argument("--quick", action="store_true", help="smaller workloads (a smoke run, ratios noisier)")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE.parent))
    from lmctl.home import lmctl_home

    # The parts run as children: they must find the model where `lmctl models pull` put it.
    os.environ["LMCTL_HOME"] = str(lmctl_home())
    py, parts = sys.executable, args.only.split(",")
    table: list[tuple[str, list[str]]] = []
    quick = args.quick
    if "train" in parts:
        table.append(("train", run_part("train", [py, str(HERE / "bench_train.py"), "--model", args.model, "--trl",
                                                  "--examples", "48" if quick else "160"])))
    if "eval" in parts:
        table.append(("eval", run_part("eval", [py, str(HERE / "bench_eval.py"), "--model", args.model,
                                                "--threads", str(args.threads), "--tokens", "4000" if quick else "30000"])))
    if "serve" in parts:
        table.append(("serve", run_part("serve", [py, str(HERE / "bench_serve.py"), "--model", args.model,
                                                  "--servers", "lmctl,transformers", "--threads", str(args.threads),
                                                  "--requests", "16" if quick else "64"])))
    if "startup" in parts:
        table.append(("start-up", startup(args.model, 2 if quick else 5)))
    print(f"\n== peer table (load average {os.getloadavg()[0]:.1f})")
    for name, lines in table:
        for line in lines:
            print(f"{name:9} {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
