"""Benchmark lmctl's data path against plain `datasets` load + batched `map` on one JSONL file.

Generates a synthetic JSONL of the given size from text every Python ships (the language
reference in `pydoc_data.topics`: paragraphs recombined by a seeded RNG into documents of
~1.2 KB), then runs, each as its own process, measuring wall time, the peak RSS of the
main process (the kernel's ru_maxrss, exact) and the peak memory of the whole process tree
(main process + tokenizing workers, sampled every 50 ms as PSS, so pages that forked
workers share with their parent are counted once), and the tree's peak anonymous PSS
(the memory-mapped Arrow pages in PSS are page cache the kernel reclaims under pressure;
anonymous pages are what an out-of-memory kill counts; PSS again counts pages a forked worker
shares copy-on-write with its parent once):

- baseline: `load_dataset("json")` + `map(batched=True, num_proc=N)` tokenization;
- `lmctl data validate CONFIG` cold (empty LMCTL_HOME) and warm (cache hit);
- `lmctl train CONFIG --dry-run` cold (cache cleared) and warm;
- `lmctl train` for --train-steps steps on this file and on a 10 MB file (warm caches).

Prints one table with ratios against the baseline, and the targets of issue 13.

    python scripts/bench_data.py --size-mb 100 [--model smollm2-135m] [--num-proc 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

BASELINE = """
import sys
from datasets import load_dataset
from transformers import AutoTokenizer
path, model, procs, cache = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
tok = AutoTokenizer.from_pretrained(model)
ds = load_dataset("json", data_files=path, split="train", cache_dir=cache)
out = ds.map(lambda b: tok(b["text"]), batched=True, num_proc=procs if procs > 1 else None,
             remove_columns=ds.column_names)
print(out.num_rows)
"""


def write_corpus(path: Path, size_mb: float, seed: int = 0) -> int:
    """Documents of 3-12 reference paragraphs until the file reaches size_mb; returns rows."""
    from pydoc_data.topics import topics

    paragraphs = [p.strip() for text in topics.values() for p in text.split("\n\n") if len(p.strip()) > 40]
    rng = random.Random(seed)
    target, rows = int(size_mb * 1_000_000), 0
    with path.open("w", encoding="utf-8") as fh:
        while fh.tell() < target:
            doc = "\n\n".join(rng.choice(paragraphs) for _ in range(rng.randint(1, 3)))
            fh.write(json.dumps({"text": doc}) + "\n")
            rows += 1
    return rows


def _pss_of(pid: int) -> tuple[int, int]:
    """(PSS, anonymous PSS) in bytes, from the kernel's smaps_rollup."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as fh:
        for line in fh:
            name, _, rest = line.partition(":")
            if name in ("Pss", "Pss_Anon"):
                fields[name] = int(rest.split()[0]) * 1024
    return fields["Pss"], fields["Pss_Anon"]


def _tree_memory(root: psutil.Process) -> tuple[int, int]:
    """(PSS, anonymous PSS) of the process tree. File-backed pages (the memory-mapped Arrow
    files) are page cache the kernel can drop under pressure; anonymous pages are what an
    out-of-memory kill counts."""
    pss = anon = 0
    for p in [root, *root.children(recursive=True)]:
        try:
            one, one_anon = _pss_of(p.pid)
        except (OSError, KeyError, psutil.Error):  # a worker that just exited
            continue
        pss, anon = pss + one, anon + one_anon
    return pss, anon


def measure(cmd: list[str], env: dict[str, str]) -> tuple[float, float, float, float, str]:
    """(wall s, peak RSS GB of the main process, peak PSS GB and peak anonymous GB of the
    process tree, stdout)."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, done = [0, 0], threading.Event()

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                pss, anon = _tree_memory(root)
                peak[0], peak[1] = max(peak[0], pss), max(peak[1], anon)
            except psutil.Error:
                pass
            time.sleep(0.05)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out = proc.stdout.read() if proc.stdout else ""  # type: ignore[union-attr]
    err = proc.stderr.read() if proc.stderr else ""  # type: ignore[union-attr]
    _, status, usage = os.wait4(proc.pid, 0)  # ru_maxrss (KiB) of the main process
    proc.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    thread.join()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-2000:]}")
    return wall, usage.ru_maxrss / 2**20, peak[0] / 2**30, peak[1] / 2**30, out


def config(work: Path, name: str, data: Path, model: str, num_proc: int, steps: int) -> Path:
    cfg = {"model": {"base": model}, "data": {"train": str(data), "max_length": 512, "num_proc": num_proc},
           "train": {"max_steps": max(1, steps), "batch_size": 4, "save_every": 1000, "eval_every": 1000},
           "output": {"dir": str(work / "runs"), "run_name": name}}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=100)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--num-proc", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--train-steps", type=int, default=2, help="0 skips the two training runs")
    parser.add_argument("--skip-cold-dry-run", action="store_true",
                        help="keep validate's cache for the dry-run (it builds the same entry) and time only the warm one")
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a new temp dir)")
    args = parser.parse_args()

    from lmctl.modelref import resolve_base

    model = resolve_base(args.model)
    work = Path(tempfile.mkdtemp(dir=args.work))
    lmctl = [sys.executable, "-m", "lmctl"]
    env = {**os.environ, "LMCTL_HOME": str(work / "home"), "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    try:
        data, small = work / "data.jsonl", work / "small.jsonl"
        rows = write_corpus(data, args.size_mb)
        write_corpus(small, 10, seed=1)
        cfg = config(work, "big", data, model, args.num_proc, args.train_steps)
        print(f"data: {data.stat().st_size / 1e6:.0f} MB, {rows} rows, num_proc {args.num_proc}, "
              f"load average {os.getloadavg()[0]:.2f}", file=sys.stderr)
        results: dict[str, tuple[float, float, float, float]] = {}

        def run(label: str, cmd: list[str]) -> str:
            wall, rss, pss, anon, out = measure(cmd, env)
            results[label] = (wall, rss, pss, anon)
            print(f"{label:38s} {wall:8.1f} s  RSS {rss:5.2f} GB  tree PSS {pss:5.2f} GB  tree anon {anon:5.2f} GB  "
                  f"(load {os.getloadavg()[0]:.2f})", file=sys.stderr)
            return out

        run("baseline: datasets load + map", [sys.executable, "-c", BASELINE, str(data), model, str(args.num_proc),
                                                str(work / "baseline-cache")])
        shutil.rmtree(work / "baseline-cache", ignore_errors=True)
        run("lmctl data validate (cold)", [*lmctl, "data", "validate", str(cfg), "--json"])
        run("lmctl data validate (warm)", [*lmctl, "data", "validate", str(cfg), "--json"])
        if not args.skip_cold_dry_run:
            subprocess.run([*lmctl, "data", "cache", "clear"], env=env, check=True, capture_output=True)
            run("lmctl train --dry-run (cold)", [*lmctl, "train", str(cfg), "--dry-run", "--json"])
        plan = json.loads(run("lmctl train --dry-run (warm)", [*lmctl, "train", str(cfg), "--dry-run", "--json"]))
        if args.train_steps:
            small_cfg = config(work, "small", small, model, args.num_proc, args.train_steps)
            subprocess.run([*lmctl, "train", str(small_cfg), "--dry-run"], env=env, check=True, capture_output=True)
            run(f"lmctl train {args.train_steps} steps, 10 MB file", [*lmctl, "train", str(small_cfg), "--json"])
            run(f"lmctl train {args.train_steps} steps, this file", [*lmctl, "train", str(cfg), "--json"])
        cache_mb = sum(p.stat().st_size for p in (work / "home").rglob("*") if p.is_file()) / 1e6
        report(results, plan, cache_mb, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(results: dict[str, tuple[float, float, float, float]], plan: dict, cache_mb: float, args: argparse.Namespace) -> None:
    base_wall = results["baseline: datasets load + map"][0]
    print(f"\n| step ({args.size_mb:g} MB) | wall s | x baseline | peak RSS GB (main) | peak PSS GB (tree) | peak anonymous PSS GB (tree) |\n"
          "|---|---|---|---|---|---|")
    for label, (wall, rss, pss, anon) in results.items():
        print(f"| {label} | {wall:.1f} | {wall / base_wall:.2f}x | {rss:.2f} | {pss:.2f} | {anon:.2f} |")
    memory = plan["memory"]
    print(f"\ndry-run estimate: {memory['estimated_peak_gb']} GB (data pipeline {memory['data_gb']} GB); "
          f"LMCTL_HOME after the runs: {cache_mb:.0f} MB; load average {os.getloadavg()[0]:.2f}")
    cold = results["lmctl data validate (cold)"][0] / base_wall
    warm = results["lmctl train --dry-run (warm)"][0]
    peak = max(results[label][2] for label in ("lmctl data validate (cold)", "lmctl train --dry-run (cold)")
               if label in results)
    print(f"targets: validate+dry-run peak (tree PSS) < 2 GB: {peak:.2f}; cold validate <= 1.5x baseline: {cold:.2f}x; "
          f"warm dry-run < 15 s: {warm:.1f} s")
    if args.train_steps:
        big = results[f"lmctl train {args.train_steps} steps, this file"][2]
        small = results[f"lmctl train {args.train_steps} steps, 10 MB file"][2]
        print(f"training peak RSS vs 10 MB file: {big:.2f} vs {small:.2f} GB (+{big - small:.2f}; target < 0.5)")


if __name__ == "__main__":
    main()
