"""The memory plan against the measured peak of real `lmctl train` runs (issue 25 item 2).

For each shape and row length it builds a random-weight model from a config (SmolLM2's
tokenizer), writes short documents that packing puts ~5 to a row (so attention gets the
block-diagonal mask, as when lmctl trains on short documents), and runs `lmctl train`
for 2 steps. The plan is what `--dry-run` reports for the same config (computed in this
process through the same code); the measured peak is:

- on the CPU: the peak RSS of the `lmctl train` process (os.wait4's ru_maxrss, exact);
- on CUDA: torch.cuda.max_memory_allocated of the run (in this process) plus the CUDA
  context this process holds (device memory in use that torch did not reserve).

It prints estimate, measured peak and their ratio per case (goal: within 0.85-1.15).

    python scripts/bench_memory_plan.py [--shapes 135m,0.5b,1.5b] [--lengths 512,2048]
                                        [--tokenizer smollm2-135m] [--threads 2]
    python scripts/bench_memory_plan.py --breakdown --shapes 135m --lengths 2048
        # in process, one case per process: bytes saved for backward against activation_bytes,
        # and RSS after forward beyond them against heap_bytes

Shapes: "135m" is SmolLM2-135M (30 layers, vocab 49,152); "0.5b" Qwen2.5-0.5B's with 6 layers
(hidden 896, vocab 151,936, tied head) as in issue 25; "1.5b" Qwen2.5-1.5B's (hidden 1536,
heads 12/2, MLP 8960, vocab 151,936, tied) with 2 layers to fit a small CPU.
Batch: 2 rows at 512 tokens, 1 at 2048.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from gpu_train import SHAPES as FULL_SHAPES

# The shapes scripts/gpu_check.py trains (gpu_train.SHAPES, one table), with the layers cut so
# two steps fit a 2-core CPU; the plan counts layers, so fewer of them test it as well.
CPU_LAYERS = {"135M": 30, "0.5B": 6, "1.5B": 2}
SHAPES: dict[str, dict[str, Any]] = {name.lower(): {**FULL_SHAPES[name], "num_hidden_layers": layers}
                                     for name, layers in CPU_LAYERS.items()}


def build_model(shape: str, tokenizer_path: str, out: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    spec = dict(SHAPES[shape])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec, tie_word_embeddings=True,
                                  max_position_embeddings=4096)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(out)
    return out


def write_data(path: Path, rows: int, length: int) -> None:
    """Documents of ~length / 5 tokens (a "w12345" word is ~5.7 SmolLM2 tokens), 6 per row asked for: packing puts
    about five in each row, so every row holds several examples (block-diagonal attention mask), as
    lmctl trains on short documents, and the rows are nearly full."""
    import random

    rng = random.Random(0)
    words = [f"w{rng.randrange(50000)}" for _ in range(4000)]
    with path.open("w") as f:
        for _ in range(6 * rows):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(length // 30))}) + "\n")


def config_for(model: Path, data: Path, runs: Path, length: int, batch: int) -> list[str]:
    return [f"model.base={model}", f"data.train={data}", f"data.max_length={length}", f"train.batch_size={batch}",
            "train.max_steps=2", "train.log_every=1", "train.save_every=1000", "train.eval_every=1000",
            "lora.r=16", "lora.alpha=32", "lora.dropout=0.0", f"output.dir={runs}", "output.run_name=plan"]


def breakdown(shape: str, length: int, batch: int) -> None:
    """Where the memory of one shape goes, in this process: the bytes autograd saves for backward
    (unique storages, via saved_tensors_hooks) per token and layer against the plan's
    activation_bytes, and the RSS growth over forward (what glibc's heap keeps beyond them,
    the plan's heap_bytes) at the first and second step, from the RSS of the loaded model; packed rows of ~length/4-token examples
    (position_ids restart, as lmctl.data.packing makes them)."""
    import psutil
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from lmctl.train import gated_mlp, headloss, memory

    spec = dict(SHAPES[shape])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec, tie_word_embeddings=True,
                                  max_position_embeddings=4096, use_cache=False)
    model = get_peft_model(AutoModelForCausalLM.from_config(config),
                           LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    headloss.install(model, "auto")
    gated_mlp.install(model)
    rss = lambda: psutil.Process().memory_info().rss  # noqa: E731
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    ids = torch.randint(0, config.vocab_size, (batch, length))
    positions = torch.arange(length // 4).repeat(batch, 4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    tokens, layers, gb = batch * length, config.num_hidden_layers, 2**30
    shape_ = memory.Shape(0, 0, 0, config.hidden_size, config.intermediate_size,
                          config.num_key_value_heads * (getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads), config.num_attention_heads, layers,
                          config.vocab_size, False, gated_mlp=True)
    work = memory.Workload(batch, length, False, recompute_mlp=True, packed=True)
    planned, heap = memory.activation_bytes(shape_, work, 4, False), memory.heap_bytes(shape_, work, 4, True)
    before = rss()  # the model loaded: each forward's growth is measured from here
    for step in (1, 2):
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                saved[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, labels=ids, position_ids=positions).loss
        grown, kept = rss() - before, sum(saved.values())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del loss
        print(f"{shape} {batch}x{length} step {step}: saved {kept / gb:.3f} GB "
              f"({kept / (tokens * layers * 4):,.0f} floats per token-layer; plan {planned / gb:.3f} GB), "
              f"RSS after forward +{grown / gb:.3f} GB over the loaded model: {(grown - kept) / gb:.3f} GB beyond "
              f"the saved "
              f"(plan heap_bytes {heap / gb:.3f} GB)", flush=True)


def measure_cpu(sets: list[str], threads: int) -> float:
    """Peak RSS (bytes) of one real `lmctl train` process: its own ru_maxrss from os.wait4."""
    cmd = [sys.executable, "-m", "lmctl", "train", str(EMPTY), "--json", "--resume", "never"]
    cmd += [arg for s in sets for arg in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            err.seek(0)
            raise SystemExit(f"lmctl train failed ({proc.returncode}): {err.read().decode()[-1500:]}")
    return usage.ru_maxrss * 1024.0


def measure_cuda(sets: list[str]) -> float:
    """max_memory_allocated of the run plus the CUDA context (device memory torch did not reserve)."""
    import torch

    from lmctl.config import load_config
    from lmctl.train import train

    torch.cuda.init()
    free, total = torch.cuda.mem_get_info()
    context = total - free - torch.cuda.memory_reserved()
    torch.cuda.reset_peak_memory_stats()
    train(load_config(EMPTY, sets), resume="never")
    return float(torch.cuda.max_memory_allocated() + context)


def estimate(sets: list[str]) -> Any:
    from lmctl.config import load_config
    from lmctl.train.plan import PlannedRun

    return PlannedRun(load_config(EMPTY, sets), "never").plan.memory


EMPTY = Path(tempfile.mkdtemp()) / "empty.yaml"  # every setting comes as --set


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="135m,0.5b,1.5b")
    parser.add_argument("--lengths", default="512,2048")
    parser.add_argument("--tokenizer", default="smollm2-135m", help="a pulled model name or a path")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--breakdown", action="store_true", help="saved bytes and heap growth per shape, in process")
    args = parser.parse_args()
    import torch

    from lmctl.modelref import resolve_base

    EMPTY.write_text("{}\n")
    tokenizer = resolve_base(args.tokenizer)
    if args.breakdown:  # one process per case: the heap a case leaves would hide the next one's growth
        cases = [(shape, int(length)) for shape in args.shapes.split(",") for length in args.lengths.split(",")]
        if len(cases) == 1:
            breakdown(cases[0][0], cases[0][1], 2 if cases[0][1] <= 1024 else 1)
        for shape, length in cases if len(cases) > 1 else []:
            subprocess.run([sys.executable, __file__, "--breakdown", "--shapes", shape, "--lengths", str(length)],
                           check=True)
        return 0
    work = Path(tempfile.mkdtemp())
    cuda = torch.cuda.is_available()
    print(f"{'shape':6} {'len':>5} {'batch':>5} {'estimate':>9} {'measured':>9} {'ratio':>6}  dominant   "
          f"({'max_memory_allocated + context' if cuda else 'peak RSS'})")
    ratios = []
    for shape in args.shapes.split(","):
        model = build_model(shape, tokenizer, work / shape)
        for length in (int(x) for x in args.lengths.split(",")):
            batch = 2 if length <= 1024 else 1
            data = work / f"{shape}-{length}.jsonl"
            write_data(data, 4 * batch, length)
            sets = config_for(model, data, work / "runs", length, batch)
            plan = estimate(sets)
            measured = measure_cuda(sets) if cuda else measure_cpu(sets, args.threads)
            ratio = plan.estimated_peak_gb * 2**30 / measured
            ratios.append(ratio)
            parts = " ".join(f"{k}={getattr(plan, k + '_gb'):.2f}" for k in
                             ("weights", "optimizer", "activations", "logits", "data", "runtime"))
            print(f"{shape:6} {length:5} {batch:5} {plan.estimated_peak_gb:8.2f}G {measured / 2**30:8.2f}G "
                  f"{ratio:6.2f}  {plan.dominant:10} {parts}", flush=True)
    inside = sum(0.85 <= r <= 1.15 for r in ratios)
    print(f"{inside}/{len(ratios)} within +-15% (ratios {min(ratios):.2f}-{max(ratios):.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
