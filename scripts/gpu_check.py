"""The GPU check (issues 16, 22 and 25): what one CUDA machine runs in under 8 minutes.

Rows print as they are measured (a run stopped at its time limit still shows what it got),
as a markdown table; parts, each left out with `--skip PART,...`:
- `timing` (scripts/gpu_train.py): lmctl's training and TRL's SFTTrainer in this process on
  the 135M shape, 1024-token packed rows, timed by one TrainerCallback that starts the clock
  after 10 warm-up steps with `cuda.synchronize()`; 3 interleaved repeats at batch 8, a batch
  sweep (4 and 16), and a torch.profiler capture of 5 steps of each: the GPU-busy share and
  the SDPA kernel (aten op) attention ran on;
- `shapes`: the 135M, 0.5B and 1.5B shapes (random weights, bf16) at 2048-token rows, lmctl
  and TRL, without and with Liger Kernel (`train.kernels=liger` / `use_liger_kernel=True`,
  where liger_kernel imports): tokens/s, peak `max_memory_allocated`, MFU (formula in
  gpu_train.py), and the goals with PASS/MISS: >= 1.2x TRL's tokens/s at <= 0.7x its peak
  without Liger; >= 1.0x TRL + Liger; MFU >= 35% at 1.5B/2048;
- `serve` (scripts/gpu_infer.py): the engine against one-at-a-time `generate`, greedy, fp32
  and bf16 (first divergence), its attention kernel checked with SDPA restricted to it, and
  tokens/s at 1, 8 and 32 clients;
- `eval`, `lm-eval`: lmctl perplexity and lm-eval-harness HFLM, warm, timed alike;
- `launch` (left out unless `--skip` is given without it): `lmctl train` subprocesses, bf16
  LoRA and QLoRA, DDP and FSDP2 through torchrun on every GPU, and FSDP's checkpoint in eval.

A part that would start past `--budget-s` (default 420 s) prints a skipped row instead, and
so does a training run past 30% of it (timing) or 75% (shapes), so serve and eval get their
turn and the whole check ends within 8 minutes.
Without CUDA it exits 2 at once with one line saying so. `LMCTL_GPU_CHECK_ON_CPU=1` runs a
smoke version on the CPU instead (tiny shape, a few steps, no goals): the code paths, not
the numbers. The models are built from config around `--tokenizer` (a directory with a
tokenizer's files; SmolLM2's, carried by scripts/gpu_wheels.py). docs/distributed.md
("On a GPU") has the command that carries the wheels and runs this.

    python scripts/gpu_check.py --tokenizer DIR [--skip serve,lm-eval] [--budget-s 420]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(HERE.parent), os.environ.get("PYTHONPATH")) if p)}


def peak_bf16_flops() -> float:
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        a @ a
    torch.cuda.synchronize()
    return 20 * 2 * 8192**3 / (time.perf_counter() - t0)


def lmctl_train(config: Path, name: str, *args: str) -> dict[str, Any]:
    """`lmctl train CONFIG ARGS --json` in its own process (so each run starts with a free GPU)."""
    cmd = [sys.executable, "-m", "lmctl", "train", str(config), "--set", f"output.run_name={name}", "--json", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=ENV)
    if out.returncode != 0:
        raise RuntimeError(f"exit {out.returncode}: {(out.stderr.strip().splitlines() or ['?'])[-1][:120]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def train_rows(path: str, texts_file: Path, steps: int, work: Path, peak: float) -> tuple[list[list[str]], dict]:
    """bf16 and QLoRA in one process, DDP and FSDP on every GPU; returns the rows and each run's result."""
    import torch

    from lmctl.loading import load_base_model

    gpus = torch.cuda.device_count()
    params = sum(p.numel() for p in load_base_model(path, "bfloat16").parameters())
    config = work / "train.yaml"
    config.write_text(json.dumps({  # JSON is YAML; batch 8 per process, so DDP and FSDP share a global batch
        "model": {"base": path}, "data": {"train": str(texts_file), "max_length": 1024},
        "train": {"batch_size": 8, "max_steps": steps, "save_every": steps, "eval_every": 100000, "log_every": 5},
        "output": {"dir": str(work / "runs")}}))
    runs = [("bf16 LoRA, 1 process", "bf16", 1, []), ("QLoRA 4-bit, 1 process", "qlora", 1,
            ["--set", "lora.quantization=4bit"])]
    runs += [(f"{mode.upper()} bf16 LoRA, torchrun x{gpus} GPU", mode, gpus,
              ["--nproc-per-node", str(gpus), "--set", f"train.distributed={mode}"]) for mode in ("ddp", "fsdp")]
    rows, results = [], {}
    for label, name, procs, args in runs:
        try:
            result = results[name] = lmctl_train(config, name, *args)
        except Exception as exc:  # noqa: BLE001 - a missing bitsandbytes is a row, not the end of the check
            rows.append([f"train {label}", f"FAILED: {type(exc).__name__}: {str(exc)[:100]}", "", ""])
            continue
        tps = result["tokens_per_s"]
        rows.append([f"train {label}", f"{tps:,.0f} tok/s", f"MFU {6 * params * tps / (peak * procs):.1%}",
                     f"{result['steps']} steps, ran {result['distributed']} x{result['world_size']}"])
    return rows, results


def fsdp_rows(path: str, results: dict, texts: list[str]) -> list[list[str]]:
    """The FSDP run against DDP's loss, and its sealed checkpoint at world size 1: lmctl vs plain peft."""
    if "fsdp" not in results or "ddp" not in results:
        return [["FSDP vs DDP", "n/a: a run failed above", "", ""]]
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmctl.evaluate.perplexity import perplexity

    ddp, fsdp = results["ddp"]["train_loss"], results["fsdp"]["train_loss"]
    sealed = results["fsdp"]["checkpoint"]
    data = Path(tempfile.mkdtemp()) / "eval.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cmd = [sys.executable, "-m", "lmctl", "eval", sealed, "--data", str(data), "--max-length", "1024", "--stride", "512",
           "--batch-size", "1", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=ENV)
    if out.returncode != 0:
        return [["FSDP checkpoint: lmctl eval", f"FAILED: exit {out.returncode}", out.stderr[-100:], ""]]
    ours = json.loads(out.stdout.strip().splitlines()[-1])["sums"]
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)  # lmctl's "auto" on CUDA
    model = PeftModel.from_pretrained(base, sealed).to("cuda").eval()
    plain = perplexity(model, AutoTokenizer.from_pretrained(sealed), texts, 1024, 512, batch_size=1).sums
    return [["FSDP vs DDP final train loss", f"{fsdp:.4f} vs {ddp:.4f}", f"rel diff {abs(fsdp - ddp) / ddp:.1e}",
             "bf16: expect ~1e-2"],
            ["FSDP checkpoint at world size 1", f"lmctl eval NLL {ours['nll_sum']:.4f}",
             f"plain peft {plain.nll_sum:.4f}", f"rel diff {abs(plain.nll_sum - ours['nll_sum']) / ours['nll_sum']:.1e}"]]


def _print(rows: Any) -> None:
    for row in rows:
        print("| " + " | ".join(row) + " |", flush=True)


class Budget:
    """Parts start only while the check is under `seconds`; each says so when it does not."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.start = seconds, time.perf_counter()

    def allows(self, part: str) -> bool:
        spent = time.perf_counter() - self.start
        if spent < self.seconds:
            return True
        _print([[f"{part}", f"skipped: {spent:.0f} s spent of the {self.seconds:.0f} s budget", "", ""]])
        return False


def _device_row(smoke: bool) -> tuple[float, list[str]]:
    import torch

    if smoke:
        return 0.0, ["device CPU (LMCTL_GPU_CHECK_ON_CPU=1: a smoke run, not numbers)", f"torch {torch.__version__}",
                     "", ""]
    peak = peak_bf16_flops()
    import transformers

    return peak, [f"device {torch.cuda.get_device_name()} x{torch.cuda.device_count()}",
                  f"bf16 matmul peak {peak / 1e12:.0f} TFLOP/s (8192^3, random data)",
                  f"torch {torch.__version__}, transformers {transformers.__version__}", _versions()]


def _versions() -> str:
    import importlib.metadata as md

    found = []
    for name in ("trl", "peft", "liger-kernel", "lm_eval"):
        try:
            found.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            found.append(f"{name} missing")
    return ", ".join(found)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, default=HERE.parent / ".whl" / "tokenizer",
                        help="a directory with a tokenizer's files (default: .whl/tokenizer, from gpu_wheels.py)")
    parser.add_argument("--skip", default="launch",
                        help="comma-separated parts to leave out: timing, shapes, serve, eval, lm-eval, launch")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="start no part or training run after this many seconds (the whole check: <= 8 minutes)")
    parser.add_argument("--steps", type=int, default=30, help="steps of each `launch` run")
    args = parser.parse_args()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    smoke = os.environ.get("LMCTL_GPU_CHECK_ON_CPU") == "1"
    import torch

    if not torch.cuda.is_available() and not smoke:
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine",
              file=sys.stderr)
        return 2
    if not (args.tokenizer / "tokenizer_config.json").is_file():
        print(f"gpu_check: {args.tokenizer} holds no tokenizer (tokenizer_config.json); see --tokenizer",
              file=sys.stderr)
        return 2
    os.environ.setdefault("LMCTL_HOME", str(Path(tempfile.mkdtemp()) / "home"))
    ENV.setdefault("LMCTL_HOME", os.environ["LMCTL_HOME"])
    return run_parts(args, skip, smoke)


def run_parts(args: argparse.Namespace, skip: set[str], smoke: bool) -> int:
    import importlib.util

    from bench_eval import documents
    from demo_corpus import split_topics
    from gpu_infer import eval_rows, serve_rows
    from gpu_train import Bench, shape_rows, timing_rows

    from lmctl.loading import load_tokenizer

    budget = Budget(args.budget_s)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    peak, device = _device_row(smoke)
    print("\n| check | result | ratio / memory / MFU | notes |\n|---|---|---|---|", flush=True)
    _print([device])
    texts = split_topics()[0]
    bench = Bench(tokenizer=args.tokenizer, work=work, texts=texts, warmup=2 if smoke else 10,
                  timed=3 if smoke else 15, peak_flops=peak, smoke=smoke)
    small = "tiny" if smoke else "135M"
    # training runs stop starting at a share of the budget, so serve and eval still get their turn
    bench.deadline = budget.start + 0.3 * args.budget_s
    if "timing" not in skip and budget.allows("timing"):
        _print(timing_rows(bench, small, 64 if smoke else 1024, 2 if smoke else 8,
                           sweep=() if smoke else (4, 16), repeats=1 if smoke else 3))
    bench.deadline = budget.start + 0.75 * args.budget_s
    if "shapes" not in skip and budget.allows("shapes"):
        bench.timed = 3 if smoke else 10
        shapes = {"tiny": (64, 2)} if smoke else {"1.5B": (2048, 4), "0.5B": (2048, 8), "135M": (2048, 16)}
        liger = importlib.util.find_spec("liger_kernel") is not None
        _print(shape_rows(bench, shapes, liger))
    model = bench.model(small)
    if "serve" not in skip and budget.allows("serve"):
        _print(serve_rows(model, 8 if smoke else 32, 8 if smoke else 48, (1, 2) if smoke else (1, 8, 32)))
    if "eval" not in skip and budget.allows("eval"):
        docs = documents(load_tokenizer(str(model)), 2000 if smoke else 30000)
        _print(eval_rows(model, docs, "lm-eval" not in skip, (1, 8) if smoke else (1, 8, 32)))
    if "launch" not in skip and budget.allows("launch"):
        texts_file = work / "launch.jsonl"
        texts_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        rows, results = train_rows(str(model), texts_file, args.steps, work, peak)
        _print(rows)
        _print(fsdp_rows(str(model), results, documents(load_tokenizer(str(model)), 30000)[:8]))
    print(f"gpu_check: {time.perf_counter() - budget.start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
