"""Benchmark `lmctl train` (packed) against a plain Trainer + peft run with padding.

Same model, data (variable-length paragraphs of the Python reference), LoRA shape,
optimizer and token budget (one epoch over the same examples), in one process. Prints
real tokens/s, peak RSS of each phase, validation loss after equal tokens, and model FLOP
utilisation: 6 x params x tokens/s over the peak FLOP/s of a matmul measured here.

    python scripts/bench_train.py [--model smollm2-135m] [--examples 160] [--trl]
    python scripts/bench_train.py --nproc 2 [--model PATH] [--examples 64]

`--trl` adds the peers (issue 16, the `peers` extra): TRL's SFTTrainer with `packing=True`
(best-fit) and with `padding_free=True`, on the same texts, LoRA shape, optimizer and
rows per step as lmctl's packed run; every run's validation loss comes from the same loop.

`--step-time` measures lmctl's own overhead instead (issue 25 item 3), on a tiny random model
(2 layers, hidden 64, the 400-token test tokenizer) with packing off: ms per optimizer step of
`lmctl train` (with train.kernels=none, the plain loss: equal work; with its default auto; and
with none logging every step)
and of a plain Trainer + peft on the same rows, batch, LoRA and optimizer, all timed by the same
callback (step end to step end, after 10 warm-up steps), in this process, 3 interleaved
repeats; then start-up + finish: the wall time of whole processes that train 3 steps, `lmctl
train` against a plain Trainer script (and `--before REV`: lmctl at that git revision, from a
temporary worktree), 3 interleaved repeats.

    python scripts/bench_train.py --step-time [--before 1ab8823]

`--nproc N` measures scaling instead (issue 22): `lmctl train` on the same data and global
batch (`--batch-size` packed rows per optimizer step) in 1 process and in N processes
(`--nproc-per-node N`: DDP, gloo on CPU, batch_size / N rows each), every process with one
torch thread, plus 1 process with N threads (what one process gets from the same cores).
Each run is its own `lmctl train` subprocess; tokens/s is the JSON result's (all processes,
Trainer loop only). Scaling efficiency = tokens/s at N / (N x tokens/s at 1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import datasets
import psutil
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
from demo_corpus import split_topics  # noqa: E402

from lmctl.config import load_config  # noqa: E402
from lmctl.data.examples import build_examples, collate  # noqa: E402
from lmctl.loading import load_base_model, load_for_inference, load_tokenizer  # noqa: E402
from lmctl.modelref import resolve, resolve_base  # noqa: E402


class PeakRss:
    """Sample this process's RSS every 50 ms while the block runs."""

    def __enter__(self) -> "PeakRss":
        self.peak, self.running = 0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        proc = psutil.Process()
        while self.running:
            self.peak = max(self.peak, proc.memory_info().rss)
            time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        self.running = False
        self.thread.join()


def paragraphs(tokenizer, max_length: int, count: int) -> tuple[list[str], list[str]]:  # type: ignore[no-untyped-def]
    train_docs, val_docs = split_topics()
    def pick(docs: list[str], n: int) -> list[str]:
        paras = [p.strip() for d in docs for p in d.split("\n\n") if p.strip()]
        keep = [p for p in paras if 16 <= len(tokenizer(p)["input_ids"]) < max_length]
        return keep[:n]
    return pick(train_docs, count), pick(val_docs, max(16, count // 4))


def peak_matmul_flops() -> float:
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(10):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * 1024**3 / best


def val_loss(model, tokenizer, examples, batch_size: int = 8) -> float:  # type: ignore[no-untyped-def]
    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(examples), batch_size):
            batch = collate(examples[i : i + batch_size], tokenizer.pad_token_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            labels = batch["labels"][:, 1:]
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100, reduction="sum")
            total += float(nll)
            count += int((labels != -100).sum())
    return total / count


def baseline(base_path: str, tokenizer, examples, args) -> tuple[float, float, object]:  # type: ignore[no-untyped-def]
    """Plain Trainer + peft: dynamic padding to the longest example of each batch."""
    import datasets
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments, set_seed

    set_seed(0)
    model = get_peft_model(load_base_model(base_path), LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                                   target_modules="all-linear", task_type="CAUSAL_LM"))
    targs = TrainingArguments(output_dir=tempfile.mkdtemp(), num_train_epochs=1, per_device_train_batch_size=args.batch_size,
                              learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=0.05, seed=0, data_seed=0,
                              report_to="none", save_strategy="no", logging_steps=1000, disable_tqdm=True,
                              use_cpu=True, remove_unused_columns=False)
    trainer = Trainer(model=model, args=targs, train_dataset=datasets.Dataset.from_list(examples),
                      data_collator=lambda rows: collate(rows, tokenizer.pad_token_id))
    t0 = time.perf_counter()
    trainer.train()
    return time.perf_counter() - t0, val_loss(model, tokenizer, args.val_examples), model


def trl_run(base_path: str, tokenizer, texts: list[str], args, rows: int, mode: str) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """TRL SFTTrainer (packing or padding-free); returns (seconds, validation loss)."""
    import datasets
    from peft import LoraConfig
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    set_seed(0)
    # TRL 1.16 refuses padding_free with a max_length it would not enforce; every text here
    # is shorter than max_length (paragraphs() keeps only those), so None truncates nothing.
    extra = ({"packing": True, "max_length": args.max_length} if mode == "packing"
             else {"padding_free": True, "max_length": None})
    cfg = SFTConfig(output_dir=tempfile.mkdtemp(), num_train_epochs=1, per_device_train_batch_size=rows,
                    learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=0.05, seed=0, data_seed=0,
                    report_to="none", save_strategy="no", logging_steps=1000, disable_tqdm=True, use_cpu=True,
                    dataset_text_field="text", **extra)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=load_base_model(base_path), args=cfg, processing_class=tokenizer, peft_config=lora,
                         train_dataset=datasets.Dataset.from_list([{"text": t} for t in texts]))
    t0 = time.perf_counter()
    trainer.train()
    return time.perf_counter() - t0, val_loss(trainer.model, tokenizer, args.val_examples)


def scaling(base_path: str, work: Path, args: argparse.Namespace) -> int:
    """tokens/s of `lmctl train` at 1 process vs `args.nproc` processes, same data and global batch."""
    import subprocess

    n = args.nproc
    if n < 2 or args.batch_size % n:
        print(f"--nproc {n}: needs N >= 2 dividing --batch-size {args.batch_size}", file=sys.stderr)
        return 2
    config = work / "scaling.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "model": {"base": base_path}, "data": {"train": str(work / "train.jsonl"), "max_length": args.max_length},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "train": {"lr": args.lr, "epochs": 1, "save_every": 100000, "eval_every": 100000, "log_every": 1},
        "output": {"dir": str(work / "runs")}}))
    runs = [("1 process x 1 thread", 1, 1), (f"1 process x {n} threads", 1, n), (f"{n} processes x 1 thread (DDP)", n, 1)]
    results = {}
    for name, procs, threads in runs:
        cmd = [sys.executable, "-m", "lmctl", "train", str(config), "--json", "--set",
               f"train.batch_size={args.batch_size // procs}", "--set", f"output.run_name=p{procs}t{threads}"]
        if procs > 1:
            cmd += ["--nproc-per-node", str(procs)]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        if out.returncode != 0:
            print(f"{name}: exit {out.returncode}\n{out.stderr[-2000:]}", file=sys.stderr)
            return 1
        results[name] = json.loads(out.stdout.splitlines()[-1])
    print(f"\nmodel {args.model}: {args.examples} examples, global batch {args.batch_size} packed rows of <= "
          f"{args.max_length} tokens, {results[runs[0][0]]['steps']} steps each; {os.cpu_count()} CPU cores")
    print(f"{'run':34} {'tokens/s':>9} {'seconds':>8} {'train loss':>10}")
    for name, result in results.items():
        loss = result["train_loss"] or float("nan")
        print(f"{name:34} {result['tokens_per_s']:9.1f} {result['seconds']:8.1f} {loss:10.4f}")
    one, wide, many = (results[name]["tokens_per_s"] for name, _, _ in runs)
    print(f"scaling efficiency {n} processes: {many / (n * one):.1%} of {n} x one single-thread process; "
          f"{many / wide:.2f}x one process with {n} threads")
    return 0


class StepClock:
    """A Trainer callback recording when each optimizer step ends (host clock)."""

    def __new__(cls):  # type: ignore[no-untyped-def]
        from transformers import TrainerCallback

        class Clock(TrainerCallback):
            def __init__(self) -> None:
                self.ends: list[float] = []

            def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
                self.ends.append(time.perf_counter())

            def ms_per_step(self, warmup: int = 10) -> float:
                ends = self.ends[warmup:]
                return 1000 * (ends[-1] - ends[0]) / (len(ends) - 1)

        return Clock()


def _clocked_trainer(clock):  # type: ignore[no-untyped-def]
    """transformers.Trainer with `clock` added; lmctl imports Trainer from transformers when it trains."""
    import transformers

    class Clocked(ORIGINAL_TRAINER):  # type: ignore[misc, valid-type]
        def __init__(self, *a, **kw):  # type: ignore[no-untyped-def]
            super().__init__(*a, **kw)
            self.add_callback(clock)

    transformers.Trainer = Clocked
    return Clocked


def tiny_model(out: Path) -> Path:
    """A 2-layer, hidden-64 Llama with the 400-token test tokenizer (tests/conftest.py): a step
    this small shows any per-step overhead of lmctl's loop."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(REPO / "tests"))
    from conftest import build_tiny_model

    build_tiny_model(out)
    tok = AutoTokenizer.from_pretrained(out)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)).save_pretrained(out, safe_serialization=True)
    return out


def plain_run(base: str, examples: list, steps: int, batch: int, clock) -> float:  # type: ignore[no-untyped-def]
    """Plain Trainer + peft on `examples`, padded; returns its seconds from train() to return."""
    from peft import LoraConfig, get_peft_model
    from transformers import TrainingArguments, set_seed

    set_seed(0)
    tok = load_tokenizer(base)
    model = get_peft_model(load_base_model(base), LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    targs = TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=batch,
                              learning_rate=1e-3, report_to="none", save_strategy="no", logging_steps=100000,
                              disable_tqdm=True, use_cpu=not torch.cuda.is_available(), remove_unused_columns=False)
    trainer = _clocked_trainer(clock)(model=model, args=targs, train_dataset=examples,
                                      data_collator=lambda rows: collate(rows, tok.pad_token_id))
    t0 = time.perf_counter()
    trainer.train()
    return time.perf_counter() - t0


def step_time(args: argparse.Namespace, tokenizer_path: str, work: Path) -> int:
    import statistics

    base = str(tiny_model(work / "tiny"))
    (work / "tiny" / "texts.jsonl").write_text((work / "train.jsonl").read_text())  # for the plain child
    steps, batch = 60, 8
    sets = [f"model.base={base}", f"data.train={work / 'train.jsonl'}", f"data.max_length={args.max_length}",
            "data.packing=false", "lora.r=16", "lora.alpha=32", "lora.dropout=0.0", f"train.max_steps={steps}",
            f"train.batch_size={batch}", "train.lr=1e-3", "train.log_every=100000", "train.save_every=100000",
            "train.eval_every=100000", f"output.dir={work / 'runs'}"]
    from lmctl.train import train
    from lmctl.train.plan import PlannedRun

    if args.startup_only:
        startup(args, base, sets, work)
        return 0
    configs = {"lmctl kernels=none": load_config(None, [*sets, "train.kernels=none"]),  # the plain loss: equal work
               "lmctl kernels=auto": load_config(None, sets),
               "lmctl none, log every": load_config(None, [*sets, "train.kernels=none", "train.log_every=1"])}
    examples = list(PlannedRun(configs["lmctl kernels=none"], "never").train.examples.examples)
    ms: dict[str, list[float]] = {name: [] for name in (*configs, "plain Trainer")}
    for _ in range(3):  # interleaved, so a busy machine slows all alike
        for name, cfg in configs.items():
            clock = StepClock()
            _clocked_trainer(clock)
            train(cfg, resume="never")
            ms[name].append(clock.ms_per_step())
        clock = StepClock()
        plain_run(base, examples, steps, batch, clock)
        ms["plain Trainer"].append(clock.ms_per_step())
    print(f"tiny model (hidden 64, 2 layers, vocabulary {len(load_tokenizer(base))}), packing off, batch {batch} x "
          f"{args.max_length} tokens, {steps} steps ({os.cpu_count()} cores); ms per step after 10 warm-up")
    for name, values in ms.items():
        print(f"  {name:20} median {statistics.median(values):7.2f} ms  ({', '.join(f'{v:.2f}' for v in values)})")
    for name in configs:
        print(f"  {name} / plain: {statistics.median(ms[name]) / statistics.median(ms['plain Trainer']):.2f}x per step")
    logged = statistics.median(ms["lmctl none, log every"]) - statistics.median(ms["lmctl kernels=none"])
    print(f"  logging every step (MLflow metrics, progress): {logged:+.2f} ms per logged step")
    startup(args, base, sets, work)
    return 0


def startup(args: argparse.Namespace, base: str, sets: list[str], work: Path) -> None:
    """Start-up + finish: the wall time of whole processes that train 3 steps (equal work: the plain
    loss), `lmctl train` against a plain Trainer script, and `--before REV`'s lmctl when given."""
    import statistics
    import subprocess

    steps = 3
    (work / "empty.yaml").write_text("{}\n")
    lmctl_args = ["-m", "lmctl", "train", str(work / "empty.yaml"), "--json", "--resume", "never"]
    lmctl_args += [a for s in sets for a in ("--set", s)] + ["--set", f"train.max_steps={steps}"]
    commands = {"lmctl train": ([sys.executable, *lmctl_args, "--set", "train.kernels=none"], {}),
                "plain Trainer": ([sys.executable, __file__, "--plain-child", base, "--examples", str(steps * 8),
                                   "--max-length", str(args.max_length), "--steps", str(steps)], {})}
    if args.before:
        tree = work / "before"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), args.before], check=True,
                       capture_output=True)
        commands[f"lmctl {args.before}"] = ([sys.executable, *lmctl_args], {"PYTHONPATH": str(tree)})
    walls: dict[str, list[float]] = {name: [] for name in commands}
    cpus: dict[str, list[float]] = {name: [] for name in commands}
    try:
        for _ in range(args.repeats):
            for name, (cmd, env) in commands.items():
                t0 = time.perf_counter()
                proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        env={**os.environ, "PYTHONPATH": str(REPO), **env}, cwd=work)
                _, status, usage = os.wait4(proc.pid, 0)
                if status:
                    raise SystemExit(f"{name} failed: {' '.join(cmd)}")
                walls[name].append(time.perf_counter() - t0)
                cpus[name].append(usage.ru_utime + usage.ru_stime)  # less sensitive to a busy machine than wall
    finally:
        if args.before:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(work / "before")])
    print(f"whole process, {steps} steps (plain loss), {args.repeats} interleaved repeats: median wall and CPU "
          f"(user + system) seconds = start-up + {steps} steps + finish")
    for name in commands:
        print(f"  {name:20} wall {statistics.median(walls[name]):6.2f} s ({', '.join(f'{v:.1f}' for v in walls[name])})"
              f"  CPU {statistics.median(cpus[name]):6.2f} s ({', '.join(f'{v:.1f}' for v in cpus[name])})")
    for name in commands:
        if name != "plain Trainer":
            print(f"  {name} - plain: wall {statistics.median(walls[name]) - statistics.median(walls['plain Trainer']):+.2f} s, "
                  f"CPU {statistics.median(cpus[name]) - statistics.median(cpus['plain Trainer']):+.2f} s")


def plain_child(args: argparse.Namespace) -> int:
    """The plain-Trainer process of --step-time's start-up comparison: load, train, exit."""
    tok = load_tokenizer(args.plain_child)
    source = Path(args.plain_child) / "texts.jsonl"
    texts = [json.loads(line)["text"] for line in source.read_text().splitlines()]
    examples = list(build_examples(source, datasets.Dataset.from_list([{"text": t} for t in texts]),
                                   "text", "text", tok, args.max_length).examples)
    plain_run(args.plain_child, examples, args.steps, 8, StepClock())
    return 0


ORIGINAL_TRAINER = None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--examples", type=int, default=160)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--packed-batch", type=int, default=None,
                        help="rows per packed step (default: the count whose tokens per step are nearest the padded run's)")
    parser.add_argument("--trl", action="store_true", help="also run TRL SFTTrainer with packing and padding-free")
    parser.add_argument("--step-time", action="store_true", help="lmctl's per-step and start-up overhead vs plain Trainer")
    parser.add_argument("--plain-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=60, help=argparse.SUPPRESS)  # the plain child's
    parser.add_argument("--repeats", type=int, default=3, help="with --step-time: whole-process repeats")
    parser.add_argument("--startup-only", action="store_true", help="with --step-time: only the whole-process part")
    parser.add_argument("--before", default=None, metavar="REV",
                        help="with --step-time: also time the whole process of lmctl at git revision REV")
    parser.add_argument("--nproc", type=int, default=None,
                        help="measure 1 vs N processes (DDP) at the same global batch instead (--batch-size packed rows)")
    args = parser.parse_args()
    global ORIGINAL_TRAINER
    import transformers

    ORIGINAL_TRAINER = transformers.Trainer
    if args.plain_child:
        return plain_child(args)
    os.environ.setdefault("LMCTL_HOME", str(Path(tempfile.mkdtemp()) / "home"))
    base_path = resolve_base(args.model)
    tokenizer = load_tokenizer(base_path)
    train_texts, val_texts = paragraphs(tokenizer, args.max_length, args.examples)
    work = Path(tempfile.mkdtemp())
    (work / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in train_texts))
    if args.nproc:
        return scaling(base_path, work, args)
    if args.step_time:
        return step_time(args, base_path, work)
    examples = list(build_examples(work / "train.jsonl", datasets.Dataset.from_list([{"text": t} for t in train_texts]),
                                   "text", "text", tokenizer, args.max_length).examples)
    args.val_examples = list(build_examples(work / "train.jsonl", datasets.Dataset.from_list([{"text": t} for t in val_texts]),
                                            "text", "text", tokenizer, args.max_length).examples)
    tokens = sum(len(e["input_ids"]) for e in examples)
    lengths = sorted(len(e["input_ids"]) for e in examples)
    print(f"data: {len(examples)} examples, {tokens} tokens, length p50 {lengths[len(lengths)//2]} max {lengths[-1]}",
          file=sys.stderr)

    with PeakRss() as rss_base:
        base_s, base_loss, _ = baseline(base_path, tokenizer, examples, args)
    # Same tokens per optimizer step: a packed row holds ~max_length tokens, a padded batch
    # of `batch_size` examples holds batch_size x mean length real tokens.
    packed_batch = args.packed_batch or max(1, round(args.batch_size * tokens / len(examples) / args.max_length))
    cfg = load_config(None, [f"model.base={base_path}", f"data.train={work / 'train.jsonl'}",
                             f"data.max_length={args.max_length}", "lora.r=16", "lora.alpha=32", "lora.dropout=0.0",
                             f"train.batch_size={packed_batch}", f"train.lr={args.lr}", "train.epochs=1",
                             "train.save_every=100000", "train.eval_every=100000", f"output.dir={work / 'runs'}"])
    from lmctl.train import train

    with PeakRss() as rss_lmctl:
        result = train(cfg, resume="never")
    lm_loss = val_loss(load_for_inference(resolve(result.checkpoint)).model, tokenizer, args.val_examples)
    params = sum(p.numel() for p in load_base_model(base_path).parameters())
    peak = peak_matmul_flops()
    rows = [("plain Trainer + peft, padded", tokens / base_s, rss_base.peak, base_loss),
            ("lmctl train (packed)", tokens / result.seconds, rss_lmctl.peak, lm_loss)]
    for mode in ("packing", "padding_free") if args.trl else ():
        with PeakRss() as rss_trl:
            trl_s, trl_loss = trl_run(base_path, tokenizer, train_texts, args, packed_batch if mode == "packing"
                                      else args.batch_size, mode)
        rows.append((f"TRL SFTTrainer {mode}", tokens / trl_s, rss_trl.peak, trl_loss))
    print(f"\nmodel {args.model}: {params / 1e6:.1f}M params; peak fp32 matmul {peak / 1e9:.1f} GFLOP/s; "
          f"{tokens} training tokens each; padded batch {args.batch_size} examples, packed batch {packed_batch} rows "
          f"of <= {args.max_length} tokens; {result.steps} packed steps")
    print(f"{'run':32} {'tokens/s':>9} {'peak RSS':>9} {'val loss':>9} {'MFU':>6}")
    for name, tps, rss, loss in rows:
        print(f"{name:32} {tps:9.1f} {rss / 2**30:8.2f}G {loss:9.4f} {6 * params * tps / peak:6.1%}")
    print(f"speed-up: {rows[1][1] / rows[0][1]:.2f}x tokens/s; val loss difference {lm_loss - base_loss:+.4f}")
    for name, tps, _, loss in rows[2:]:
        print(f"lmctl vs {name}: {rows[1][1] / tps:.2f}x tokens/s; val loss difference {lm_loss - loss:+.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
