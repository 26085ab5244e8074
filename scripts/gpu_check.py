"""The GPU check (issues 16 and 22): what a CUDA machine runs in under 10 minutes, one table at the end.

Rows:
- `lmctl train` steps, each its own process, real tokens/s (all processes) and MFU
  (6 x params x tokens/s over a bf16 matmul's measured peak x GPUs): bf16 LoRA and QLoRA
  (4-bit NF4, needs bitsandbytes) in one process, then DDP and FSDP2
  (`train.distributed: fsdp`) through torchrun (`--nproc-per-node`) on every GPU here
  (`torch.cuda.device_count()`; one GPU gives one process per path);
- FSDP against DDP: the final training loss of the two runs (same data, seed and global
  batch), and the FSDP run's sealed checkpoint at world size 1: `lmctl eval` against plain
  transformers + peft (`PeftModel.from_pretrained`) on the same windows;
- eval: lmctl perplexity vs lm-eval-harness HFLM at batch 1 and its best of 8/32, on the GPU
  (goal: >= 3x lm-eval batch 1), numbers to 1e-4 relative (bf16);
- serve: the batching engine vs one-at-a-time `generate` at 8 and 32 clients, in process.

Rows print as they are measured, so a run stopped at its time limit still shows what it got;
`--skip serve,lm-eval` leaves parts out (lm-eval rows also say n/a where lm_eval is missing).

Without CUDA it exits 2 at once with one line saying so: nothing here means anything on a CPU.
`--model` is a model directory (a machine with no hub and no `lmctl models pull` builds one)
or a pulled base model's name.

    python scripts/gpu_check.py --model PATH [--steps 30] [--skip serve,lm-eval]
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
                     f"{result['steps']} steps, ran {result['distributed']} x{result['processes']}"])
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


def eval_rows(path: str, texts: list[str], with_lm_eval: bool) -> list[list[str]]:
    import importlib.util

    import torch
    from bench_eval import _lm_eval

    from lmctl.evaluate.perplexity import perplexity
    from lmctl.loading import load_base_model, load_tokenizer

    tok, model = load_tokenizer(path), load_base_model(path, "bfloat16").to("cuda").eval()
    rows, seconds = [], {}
    peers = with_lm_eval and importlib.util.find_spec("lm_eval") is not None
    for name, run in [("lmctl", lambda: perplexity(model, tok, texts, 1024, 512).doc_nll)] + [
            (f"lm-eval b{b}", lambda b=b: _lm_eval(model, tok, texts, "strided", 1024, 512, b, "cuda"))
            for b in ((1, 8, 32) if peers else ())]:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        nll = run()
        torch.cuda.synchronize()
        seconds[name] = (time.perf_counter() - t0, sum(nll))
    if not peers:
        s, total = seconds["lmctl"]
        return [[f"eval strided 1024/512: lmctl, {len(texts)} documents", f"{s:.2f} s", "lm-eval: n/a (not installed)",
                 f"NLL {total:.4f}"]]
    ours, b1 = seconds["lmctl"], seconds["lm-eval b1"]
    for name, (s, total) in seconds.items():
        rows.append([f"eval strided 1024/512: {name}", f"{s:.2f} s", f"{b1[0] / s:.2f}x lm-eval b1",
                     f"NLL rel diff {abs(total - ours[1]) / ours[1]:.1e}"])
    rows.append(["eval goal: lmctl >= 3x lm-eval b1", "met" if b1[0] / ours[0] >= 3 else "MISSED", "", ""])
    return rows


def serve_rows(path: str) -> list[list[str]]:
    from bench_serve import baseline, engine_client, make_prompts, run_level

    from lmctl.loading import load_base_model, load_tokenizer
    from lmctl.serve.engine import Engine
    from lmctl.serve.kvcache import auto_batch_limits

    tok, model = load_tokenizer(path), load_base_model(path, "bfloat16").to("cuda").eval()
    prompts = make_prompts(tok, 0, 64, 128)
    cap, kv_budget = auto_batch_limits(model)
    engine = Engine(model, tok, max_batch_size=cap, kv_budget_tokens=kv_budget)
    engine.start()
    modes = {"one-at-a-time": baseline(model, tok, 64), "lmctl engine": engine_client(engine, tok, 64)}
    rows = []
    for clients in (8, 32):
        r = {name: run_level(fn, prompts, clients, 64) for name, fn in modes.items()}
        same = sum(r["one-at-a-time"]["outputs"][i] == o for i, o in r["lmctl engine"]["outputs"].items())
        rows.append([f"serve {clients} clients", f"{r['lmctl engine']['tok_s']:,.0f} tok/s",
                     f"{r['lmctl engine']['tok_s'] / r['one-at-a-time']['tok_s']:.2f}x one-at-a-time",
                     f"greedy identical {same}/64"])
    engine.stop()
    return rows


def _print(rows: list[list[str]]) -> None:
    for row in rows:
        print("| " + " | ".join(row) + " |", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a model directory, or a pulled base model's name")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip", default="", help="comma-separated parts to leave out: serve, lm-eval")
    args = parser.parse_args()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine",
              file=sys.stderr)
        return 2
    os.environ.setdefault("LMCTL_HOME", str(Path(tempfile.mkdtemp()) / "home"))
    ENV.setdefault("LMCTL_HOME", os.environ["LMCTL_HOME"])
    from bench_eval import documents
    from demo_corpus import split_topics

    from lmctl.loading import load_tokenizer
    from lmctl.modelref import resolve_base

    path = resolve_base(args.model)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    texts_file = work / "train.jsonl"
    texts_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in split_topics()[0]))
    peak = peak_bf16_flops()
    print("\n| check | result | ratio / MFU | notes |\n|---|---|---|---|")
    _print([[f"device {torch.cuda.get_device_name()} x{torch.cuda.device_count()}",
             f"bf16 matmul peak {peak / 1e12:.0f} TFLOP/s per GPU", "", ""]])
    rows, results = train_rows(path, texts_file, args.steps, work, peak)
    _print(rows)
    texts = documents(load_tokenizer(path), 30000)
    _print(fsdp_rows(path, results, texts[:8]))
    _print(eval_rows(path, texts, "lm-eval" not in skip))
    if "serve" not in skip:
        _print(serve_rows(path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
