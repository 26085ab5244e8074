"""Peak memory and tokens/s of one LoRA step on a big vocabulary: lmctl's fused loss against full logits.

The issue-25 shape: a Qwen2.5-0.5B-shaped model (vocab 151,936, hidden 896, tied head, 6 layers,
14 heads / 2 KV heads, intermediate 4864, random weights), the tiny test tokenizer (built from
tests/assets, no download), full packed rows of 1024 tokens, batch 2, LoRA r 16 on every linear
layer, 2 steps, fp32 on the CPU. Three runs, each in its own subprocess, peak RSS read from the
child's own `ru_maxrss`:

- `lmctl train` with `train.kernels: auto` (on a CPU: the chunked pure-PyTorch loss);
- `lmctl train` with `train.kernels: none` (the model's plain loss over full logits);
- plain transformers Trainer + peft on rows of the same tokens (the baseline of the ratios).

    nice python scripts/bench_memory.py [--layers 6] [--steps 2] [--threads 1]
    nice python scripts/bench_memory.py --breakdown   # where the chunked run's memory goes
    nice python scripts/bench_memory.py --checkpointing   # adds auto + train.gradient_checkpointing

Prints each run's peak RSS and tokens/s and the ratios against the plain Trainer (targets:
peak <= 0.5x, tokens/s >= 0.95x). lmctl's MLflow runs in a worker process of its own
(lmctl/train/mlflow_worker.py): the peak RSS of the whole process tree (sampled) is printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).parent.parent
ASSETS = REPO / "tests" / "assets"
BATCH, LENGTH = 2, 1024

_LMCTL = """
import json, resource, sys
from lmctl.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), file=sys.stderr)
"""

_PLAIN = """
import json, resource, sys, time
import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments
base, data, steps, batch, length, out = sys.argv[1:7]
steps, batch, length = int(steps), int(batch), int(length)
tok = AutoTokenizer.from_pretrained(base)
ids = []
for line in open(data):
    ids += tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
rows = [{"input_ids": ids[i:i + length], "labels": ids[i:i + length]} for i in range(0, len(ids) - length + 1, length)]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                         task_type=TaskType.CAUSAL_LM))
model.config.use_cache = False
collate = lambda b: {k: torch.tensor([r[k] for r in b]) for k in ("input_ids", "labels")}
args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=batch, learning_rate=2e-4,
                         report_to="none", save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True,
                         remove_unused_columns=False, dataloader_num_workers=0)
trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)
started = time.perf_counter()
trainer.train()
seconds = time.perf_counter() - started
print(json.dumps({"code": 0, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "tokens_per_s": steps * batch * length / seconds}), file=sys.stderr)
"""


def build_base(out: Path, layers: int) -> Path:
    """The Qwen2.5-0.5B shape with random weights, and the tiny test tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    sys.path.insert(0, str(REPO / "tests"))
    from conftest import build_tiny_model

    build_tiny_model(out)  # the tokenizer files (and a tiny model, overwritten below)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    config = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(out, safe_serialization=True)
    return out


def build_data(out: Path, base: Path, tokens: int) -> Path:
    """The test corpus repeated until it holds `tokens` tokens (packed rows need full rows)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    lines = (ASSETS / "tiny_train.jsonl").read_text().splitlines()
    per_pass = sum(len(tok(json.loads(line)["text"])["input_ids"]) + 1 for line in lines)
    out.write_text("\n".join(lines * (tokens // per_pass + 1)) + "\n")
    return out


def tree_peak(proc: subprocess.Popen, every_s: float = 0.05) -> int:
    """The largest sum of RSS over `proc` and its descendants (lmctl's MLflow worker), sampled
    until it exits: the process's own peak is exact (ru_maxrss), this one is sampled."""
    import time

    import psutil

    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]))
        except psutil.Error:
            pass
        time.sleep(every_s)
    return peak


def run(code: str, args: list[str], threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=out, stderr=err, text=True, env=env)
        tree = tree_peak(proc)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    lines = [line for line in stderr.splitlines() if line.startswith('{"code"')]
    if proc.returncode or not lines:
        raise SystemExit(f"run failed: {stderr[-3000:]}")
    result = json.loads(lines[-1])
    result["tree_mb"] = tree / 2**20
    if "tokens_per_s" not in result:  # lmctl's own JSON result on stdout
        result["tokens_per_s"] = json.loads(stdout)["tokens_per_s"]
    return result


def lmctl_run(base: Path, data: Path, work: Path, kernels: str, steps: int, threads: int,
              checkpointing: bool = False) -> dict:
    cfg = {
        "model": {"base": str(base), "dtype": "float32"},
        "data": {"train": str(data), "max_length": LENGTH, "packing": True},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "train": {"max_steps": steps, "batch_size": BATCH, "save_every": 1000, "log_every": 1, "kernels": kernels,
                  "warmup_ratio": 0.0, "gradient_checkpointing": checkpointing},
        "output": {"dir": str(work / "runs"), "run_name": f"{kernels}-{checkpointing}"},
    }
    path = work / f"{kernels}-{checkpointing}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return run(_LMCTL, ["train", str(path), "--json"], threads)


def breakdown(base: Path) -> None:
    """Where the chunked run's memory goes, in process: RSS after imports and after loading,
    the bytes autograd saves for backward (unique storages, via saved_tensors_hooks), the
    chunk budget, and the peak of forward + backward of one batch."""
    import resource

    import psutil
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    from lmctl import chunked_loss
    from lmctl.train.headloss import install

    mb = lambda n: f"{n / 2**20:,.0f} MB"  # noqa: E731
    rss = lambda: psutil.Process().memory_info().rss  # noqa: E731
    start = rss()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                             task_type=TaskType.CAUSAL_LM))
    install(model, "auto")
    loaded = rss()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, 400, (BATCH, LENGTH))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    print(f"imports {mb(start)}; weights {mb(weights)} (RSS after load {mb(loaded)}); one chunk "
          f"{mb(chunked_loss.chunk_rows(151936, 4) * chunked_loss.chunk_bytes_per_row(151936, 4))}")
    # packed rows (lmctl's collate_packed): positions restart per example, so attention gets a
    # block-diagonal mask; two examples of 512 per row here
    for name, positions in (("causal rows", None), ("packed rows", torch.arange(LENGTH // 2).repeat(BATCH, 2))):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, labels=ids, position_ids=positions).loss
        after_forward = rss()
        loss.backward()
        del loss
        activations = sum(n for ptr, n in saved.items() if ptr not in params)
        print(f"{name}: saved for backward {mb(activations)} (RSS after forward {mb(after_forward)}); "
              f"peak so far {mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--breakdown", action="store_true", help="only where the chunked run's memory goes")
    parser.add_argument("--checkpointing", action="store_true", help="add lmctl auto + gradient checkpointing")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ["LMCTL_HOME"] = str(work / "home")
        base = build_base(work / "base", opts.layers)
        if opts.breakdown:
            return breakdown(base)
        data = build_data(work / "train.jsonl", base, (opts.steps + 1) * BATCH * LENGTH * 2)
        results = {
            "plain Trainer + peft": run(_PLAIN, [str(base), str(data), str(opts.steps), str(BATCH), str(LENGTH),
                                                 str(work / "plain")], opts.threads),
            "lmctl kernels=none": lmctl_run(base, data, work, "none", opts.steps, opts.threads),
            "lmctl kernels=auto": lmctl_run(base, data, work, "auto", opts.steps, opts.threads),
        }
        if opts.checkpointing:
            results["lmctl auto + grad ckpt"] = lmctl_run(base, data, work, "auto", opts.steps, opts.threads, True)
    ref = results["plain Trainer + peft"]
    print(f"Qwen2.5-0.5B shape, {opts.layers} layers, rows {BATCH}x{LENGTH}, LoRA r16, {opts.steps} steps, "
          f"fp32 CPU, {opts.threads} thread(s)")
    for name, r in results.items():
        print(f"{name:24s} peak {r['peak_mb'] / 1024:6.2f} GB ({r['peak_mb'] / ref['peak_mb']:.2f}x)  "
              f"{r['tokens_per_s']:8.1f} tokens/s ({r['tokens_per_s'] / ref['tokens_per_s']:.2f}x)")
        print(f"{'':24s} process tree (sampled every 50 ms; lmctl: with its MLflow worker) "
              f"{r['tree_mb'] / 1024:6.2f} GB ({r['tree_mb'] / ref['tree_mb']:.2f}x)")


if __name__ == "__main__":
    main()
