"""The GPU check (issue 16): what a CUDA machine runs in under 10 minutes, one table at the end.

Rows:
- bf16 LoRA and QLoRA (4-bit NF4, needs bitsandbytes) training steps through `lmctl train`:
  real tokens/s and MFU (6 x params x tokens/s over a bf16 matmul's measured peak);
- the torchrun path on one GPU (one process, NCCL): lmctl trains data-parallel with DDP and
  has no FSDP option, so FSDP does not apply; this row proves the launcher path on CUDA;
- eval: lmctl perplexity vs lm-eval-harness HFLM at batch 1 and its best of 8/32, on the GPU
  (goal: >= 3x lm-eval batch 1), numbers to 1e-4 relative (bf16);
- serve: the batching engine vs one-at-a-time `generate` at 8 and 32 clients, in process;
- the tests that skip without CUDA (`pytest -m "not team" -k "cuda or qlora or 4bit"`).

Without CUDA it exits 2 at once with one line saying so: nothing here means anything on a CPU.

    python scripts/gpu_check.py [--model smollm2-135m] [--steps 30]
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


def train_row(path: str, texts_file: Path, quant: str, steps: int, work: Path, peak: float) -> list[str]:
    from lmctl.config import load_config
    from lmctl.loading import load_base_model
    from lmctl.train import train

    cfg = load_config(None, [f"model.base={path}", f"data.train={texts_file}", "data.max_length=1024",
                             f"lora.quantization={quant}", "train.batch_size=8", f"train.max_steps={steps}",
                             "train.save_every=100000", "train.eval_every=100000", f"output.dir={work / quant}"])
    result = train(cfg, resume="never")
    params = sum(p.numel() for p in load_base_model(path, "bfloat16").parameters())
    tps = result.tokens_per_s
    name = "QLoRA 4-bit" if quant == "4bit" else "bf16 LoRA"
    return [f"train {name}", f"{tps:,.0f} tok/s", f"MFU {6 * params * tps / peak:.1%}", f"{result.steps} steps"]


def torchrun_row(path: str, texts_file: Path, work: Path) -> list[str]:
    config = work / "ddp.yaml"
    config.write_text(json.dumps({"model": {"base": path}, "data": {"train": str(texts_file)},  # JSON is YAML
                                  "train": {"max_steps": 5, "save_every": 5}, "output": {"dir": str(work / "ddp")}}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m", "lmctl",
           "train", str(config), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(HERE.parent)})
    return ["torchrun, 1 GPU (DDP; FSDP n/a)", "ok" if out.returncode == 0 else f"exit {out.returncode}", "", ""]


def eval_rows(path: str, texts: list[str]) -> list[list[str]]:
    from bench_eval import _lm_eval

    from lmctl.evaluate.perplexity import perplexity
    from lmctl.loading import load_base_model, load_tokenizer

    import torch

    tok, model = load_tokenizer(path), load_base_model(path, "bfloat16").to("cuda").eval()
    rows, seconds = [], {}
    for name, run in [("lmctl", lambda: perplexity(model, tok, texts, 1024, 512).doc_nll)] + [
            (f"lm-eval b{b}", lambda b=b: _lm_eval(model, tok, texts, "strided", 1024, 512, b, "cuda")) for b in (1, 8, 32)]:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        nll = run()
        torch.cuda.synchronize()
        seconds[name] = (time.perf_counter() - t0, sum(nll))
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine",
              file=sys.stderr)
        return 2
    os.environ.setdefault("LMCTL_HOME", str(Path(tempfile.mkdtemp()) / "home"))
    from bench_eval import documents
    from demo_corpus import split_topics

    from lmctl.loading import load_tokenizer
    from lmctl.modelref import resolve_base

    path = resolve_base(args.model)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    texts_file = work / "train.jsonl"
    texts_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in split_topics()[0]))
    peak = peak_bf16_flops()
    table: list[list[str]] = [[f"device {torch.cuda.get_device_name()}", f"bf16 matmul peak {peak / 1e12:.0f} TFLOP/s", "", ""]]
    for quant in ("none", "4bit"):
        try:
            table.append(train_row(path, texts_file, quant, args.steps, work, peak))
        except Exception as exc:  # noqa: BLE001 - a missing bitsandbytes is a row, not the end of the check
            table.append([f"train {quant}", f"FAILED: {type(exc).__name__}: {str(exc)[:80]}", "", ""])
    table.append(torchrun_row(path, texts_file, work))
    table += eval_rows(path, documents(load_tokenizer(path), 30000))
    table += serve_rows(path)
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "not team", "-k", "cuda or qlora or 4bit",
                            str(HERE.parent / "tests")], capture_output=True, text=True, cwd=HERE.parent)
    table.append(["tests that skip without CUDA", (tests.stdout.strip().splitlines() or ["?"])[-1], "", ""])
    print("\n| check | result | ratio / MFU | notes |\n|---|---|---|---|")
    for row in table:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
