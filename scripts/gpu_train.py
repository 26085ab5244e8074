"""Training on one GPU, lmctl against TRL's SFTTrainer in one process (issue 25, item 4).

Used by scripts/gpu_check.py. Both sides get the same things: a model built from config
with random weights by lmctl's own loader (sdpa attention, bf16), the same texts packed
best-fit-decreasing into rows of `length` tokens with no attention across examples (lmctl's
packing; TRL's `packing_strategy="bfd_split"`, which splits long documents as lmctl's
chunking does), LoRA r 16 / alpha 32 / dropout 0 on every linear layer of the blocks, AdamW
(the Trainer's default, fused), lr 1e-4 on a cosine schedule without warm-up, no gradient checkpointing,
and saving, evaluation, logging and reporting off (lmctl still seals one checkpoint after the
last step and opens its MLflow run before the first: both outside the clock).

The clock (`StepClock`, one TrainerCallback on both) starts after `warmup` optimizer steps and
stops after the last, each time after `torch.cuda.synchronize()`. Tokens are the trained ones
(labels other than -100), counted on the host in the data collator, so counting costs no sync.
MFU = tokens/s x FLOPs per token / the bf16 matmul peak measured on the card, with FLOPs per
token = 4 N + 6 x layers x length x (heads x head_dim): N the weights of every matmul (the
blocks' projections and the output head; the embedding lookup is no matmul); LoRA with frozen
weights costs 2 N forward and 2 N backward (activation gradients only; the adapters' own are
~1% and left out), and causal attention over a row of `length` tokens 2 x layers x length x
heads x head_dim forward, twice that backward. Recomputation is not counted.
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

# Shapes of real models (random weights; the GPU machine reaches no hub): SmolLM2-135M,
# Qwen2.5-0.5B and Qwen2.5-1.5B, tied heads. "tiny" is the CPU smoke run's.
SHAPES: dict[str, dict[str, Any]] = {
    "135M": {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
             "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152, "head_dim": 64},
    "0.5B": {"model_type": "qwen2", "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
             "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151936},
    "1.5B": {"model_type": "qwen2", "hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12,
             "num_key_value_heads": 2, "intermediate_size": 8960, "vocab_size": 151936},
    "tiny": {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 49152},
}
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
LR = 1e-4


def build_model(shape: str, tokenizer_dir: Path, out: Path) -> Path:
    """A model directory of `shape` with random weights (bf16 on CUDA) and the tokenizer's files."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").is_file():
        return out
    spec = dict(SHAPES[shape])
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = AutoConfig.for_model(spec.pop("model_type"), **spec, tie_word_embeddings=True, max_position_embeddings=8192,
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if cuda else torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    for f in tokenizer_dir.iterdir():
        if f.is_file() and f.name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges")):
            shutil.copy2(f, out / f.name)
    del model
    return out


def matmul_params(config: Any) -> int:
    """N of the module docstring: the weights of every matmul a token goes through."""
    h, heads = int(config.hidden_size), int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or h // heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    per_layer = h * heads * head_dim * 2 + h * kv * head_dim * 2 + 3 * h * int(config.intermediate_size)
    return int(config.num_hidden_layers) * per_layer + h * int(config.vocab_size)


def flops_per_token(config: Any, length: int) -> float:
    """4 N + 6 x layers x length x heads x head_dim (module docstring)."""
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or int(config.hidden_size) // heads)
    return 4.0 * matmul_params(config) + 6.0 * int(config.num_hidden_layers) * length * heads * head_dim


class _Counting:
    """A data collator that counts the trained tokens of every batch it makes (on the host)."""

    def __init__(self, inner: Any, clock: "StepClock") -> None:
        self.inner, self.clock = inner, clock

    def __call__(self, rows: Any) -> Any:
        batch = self.inner(rows)
        labels = batch.get("labels") if hasattr(batch, "get") else None
        self.clock.tokens += int((labels != -100).sum()) if labels is not None else int(batch["input_ids"].numel())
        return batch


@dataclass
class StepClock(TrainerCallback):
    """The one clock of every timed run (module docstring); `profile_steps` > 0 also records that
    many steps after the warm-up with torch.profiler."""

    warmup: int
    profile_steps: int = 0
    tokens: int = 0
    started: float | None = None
    seconds: float | None = None
    timed_tokens: int = 0
    profiler: Any = None
    profiled_s: float | None = None
    _t0: tuple[float, int] = (0.0, 0)
    _marks: dict[str, float] = field(default_factory=dict)

    def on_train_begin(self, args: Any, state: Any, control: Any, train_dataloader: Any = None, **kwargs: Any) -> None:
        if train_dataloader is None:
            raise RuntimeError("this transformers passes no train_dataloader to callbacks: cannot count tokens")
        # accelerate's DataLoaderShard wraps the DataLoader it iterates (`base_dataloader`)
        loader = getattr(train_dataloader, "base_dataloader", train_dataloader)
        loader.collate_fn = _Counting(loader.collate_fn, self)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        from lmctl.distributed import synchronized_now

        step = state.global_step
        if step == self.warmup:
            self._t0 = (synchronized_now(args.device), self.tokens)
            if self.profile_steps:
                self._start_profiler()
        if self.profiler is not None:
            self.profiler.step()
            if step == self.warmup + self.profile_steps:
                self.profiled_s = synchronized_now(args.device) - self._t0[0]
                self.profiler.stop()
        if step == state.max_steps:
            end = synchronized_now(args.device)
            self.seconds, self.timed_tokens = end - self._t0[0], self.tokens - self._t0[1]

    def _start_profiler(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        import torch

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self.profiler = profile(activities=activities)
        self.profiler.start()

    @property
    def tokens_per_s(self) -> float:
        return self.timed_tokens / self.seconds if self.seconds else 0.0


def attention_ops(prof: Any) -> list[str]:
    """The SDPA implementations the profiled steps called (aten op names, which name the kernel)."""
    names = {e.key for e in prof.key_averages()}
    kernels = sorted(n.removeprefix("aten::_scaled_dot_product_") for n in names
                     if n.startswith("aten::_scaled_dot_product_") and "attention" in n)
    return kernels or ["none fused (math: matmul + softmax)"]


def gpu_busy_share(prof: Any, wall_s: float) -> float | None:
    """Time some GPU kernel ran (overlaps merged) over the profiled steps' wall time."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if getattr(e, "device_type", None) is not None and e.device_type.name == "CUDA")
    if not spans or not wall_s:
        return None
    busy, (lo, hi) = 0.0, spans[0]
    for start, end in spans[1:]:
        if start > hi:
            busy, lo, hi = busy + hi - lo, start, end
        else:
            hi = max(hi, end)
    return (busy + hi - lo) / 1e6 / wall_s


@dataclass
class RunResult:
    tokens_per_s: float
    peak_bytes: int
    clock: StepClock
    loss: float | None = None


def _measured(run: Any, clock: StepClock) -> RunResult:
    import torch

    cuda = torch.cuda.is_available()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else 0  # what earlier runs left behind is not this run's
    loss = run()
    peak = torch.cuda.max_memory_allocated() - before if cuda else 0
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return RunResult(tokens_per_s=clock.tokens_per_s, peak_bytes=peak, clock=clock, loss=loss)


def lmctl_run(model_dir: Path, data: Path, work: Path, length: int, batch: int, steps: int, clock: StepClock,
              kernels: str | None = None) -> RunResult:
    """`lmctl train` in this process (lmctl.train.train with the clock as an extra callback)."""
    from lmctl.config import load_config
    from lmctl.train import train

    sets = [f"model.base={model_dir}", "model.dtype=auto", f"data.train={data}", f"data.max_length={length}",
            "data.packing=true", f"lora.r={LORA['r']}", f"lora.alpha={LORA['alpha']}", f"lora.dropout={LORA['dropout']}",
            f"train.batch_size={batch}", f"train.max_steps={steps}", f"train.lr={LR}", "train.warmup_ratio=0",
            "train.gradient_checkpointing=false", "train.save_every=1000000", "train.eval_every=1000000",
            "train.log_every=1000000", f"output.dir={work / 'runs'}", f"output.run_name=r{time.monotonic_ns()}"]
    if kernels is not None:
        sets.append(f"train.kernels={kernels}")  # the `loss` branch's key (auto|liger|none)

    def run() -> float | None:
        return train(load_config(None, sets), resume="never", callbacks=[clock]).train_loss

    return _measured(run, clock)


def trl_run(model_dir: Path, texts: list[str], length: int, batch: int, steps: int, clock: StepClock,
            liger: bool = False) -> RunResult:
    """TRL's SFTTrainer on the same model, texts and settings."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    from lmctl.loading import load_base_model, load_tokenizer

    def run() -> float | None:
        set_seed(0)
        cfg = SFTConfig(output_dir=str(model_dir.parent / "trl"), max_steps=steps, per_device_train_batch_size=batch,
                        learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0, seed=0,
                        data_seed=0, report_to="none", save_strategy="no", eval_strategy="no", logging_steps=1000000,
                        disable_tqdm=True, gradient_checkpointing=False, packing=True, packing_strategy="bfd_split",
                        max_length=length, dataset_text_field="text", use_liger_kernel=liger,
                        bf16=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available(),
                        dataloader_num_workers=0)
        lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                          target_modules="all-linear", task_type="CAUSAL_LM")
        trainer = SFTTrainer(model=load_base_model(str(model_dir), "auto"), args=cfg,
                             processing_class=load_tokenizer(str(model_dir)), peft_config=lora, callbacks=[clock],
                             train_dataset=datasets.Dataset.from_list([{"text": t} for t in texts]))
        out = trainer.train()
        del trainer
        return float(out.training_loss)

    return _measured(run, clock)


def write_texts(texts: list[str], path: Path) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


# ---- the rows gpu_check prints ------------------------------------------------------------


@dataclass
class Bench:
    """What every training row shares: where the models and data are, the step counts, the peak."""

    tokenizer: Path
    work: Path
    texts: list[str]
    warmup: int
    timed: int
    peak_flops: float
    smoke: bool = False  # the CPU smoke run: tiny shapes, nothing compared against goals
    deadline: float = float("inf")  # time.perf_counter() after which no run starts

    @property
    def steps(self) -> int:
        return self.warmup + self.timed

    def model(self, shape: str) -> Path:
        return build_model(shape, self.tokenizer, self.work / f"model-{shape}")

    def data(self) -> Path:
        path = self.work / "train.jsonl"
        return path if path.is_file() else write_texts(self.texts, path)

    def run(self, side: str, shape: str, length: int, batch: int, liger: bool = False,
            profile_steps: int = 0) -> RunResult:
        if time.perf_counter() > self.deadline:
            raise TimeoutError("skipped: the check's time budget is spent")
        steps = self.warmup + (profile_steps or self.timed)
        clock = StepClock(self.warmup, profile_steps)
        if side == "lmctl":
            if liger and not self._kernels_key():
                raise KeyError("train.kernels is not a config key of this lmctl (the chunked-loss change adds it)")
            return lmctl_run(self.model(shape), self.data(), self.work, length, batch, steps, clock,
                             kernels=("liger" if liger else "none") if self._kernels_key() else None)
        return trl_run(self.model(shape), self.texts, length, batch, steps, clock, liger=liger)

    def _kernels_key(self) -> bool:
        from lmctl.config import TrainConfig

        return "kernels" in TrainConfig.model_fields


def _gb(n: int) -> str:
    return f"{n / 2**30:.2f} GB" if n else "n/a (CPU)"


def _try(label: str, fn: Any) -> tuple[RunResult | None, list[str] | None]:
    try:
        return fn(), None
    except Exception as exc:  # noqa: BLE001 - an OOM or a missing key is a row, not the end of the check
        import torch

        if torch.cuda.is_available():
            gc.collect()
            torch.cuda.empty_cache()
        return None, [label, f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:110] if str(exc) else ''}", "", ""]


def timing_rows(b: Bench, shape: str, length: int, batch: int, sweep: tuple[int, ...], repeats: int) -> Any:
    """3 interleaved repeats of lmctl and TRL, a profiled run of each, a batch sweep; yields rows as measured."""
    import statistics

    runs: dict[str, list[float]] = {"lmctl": [], "TRL": []}
    for i in range(repeats):
        for side in runs:
            result, failed = _try(f"timing {side} repeat {i + 1}", lambda s=side: b.run(s, shape, length, batch))
            if failed:
                yield failed
                continue
            assert result is not None
            runs[side].append(result.tokens_per_s)
            yield [f"timing {shape}/{length} b{batch}: {side} repeat {i + 1}", f"{result.tokens_per_s:,.0f} tok/s",
                   _gb(result.peak_bytes), f"{result.clock.timed_tokens} tokens in {result.clock.seconds:.2f} s"]
    if runs["lmctl"] and runs["TRL"]:
        mine, theirs = statistics.median(runs["lmctl"]), statistics.median(runs["TRL"])
        spread = {s: (max(v) - min(v)) / max(statistics.median(v), 1e-9) for s, v in runs.items()}
        yield [f"timing {shape}/{length} b{batch}: median lmctl / TRL", f"{mine / max(theirs, 1e-9):.2f}x",
               f"spread lmctl {spread['lmctl']:.1%}, TRL {spread['TRL']:.1%}", "spread = (max - min) / median"]
    for side in runs:
        result, failed = _try(f"profile {side}", lambda s=side: b.run(s, shape, length, batch, profile_steps=5))
        if failed:
            yield failed
            continue
        assert result is not None and result.clock.profiler is not None
        busy = gpu_busy_share(result.clock.profiler, result.clock.profiled_s or 0.0)
        yield [f"profile {side} {shape}/{length} b{batch}: 5 steps", f"GPU busy {busy:.1%}" if busy is not None
               else "GPU busy n/a (no CUDA)", "attention: " + ", ".join(attention_ops(result.clock.profiler)),
               f"{result.clock.profiled_s:.2f} s profiled"]
    for bs in sweep:
        pair = {}
        for side in runs:
            result, failed = _try(f"sweep {side} b{bs}", lambda s=side: b.run(s, shape, length, bs))
            if failed:
                yield failed
            else:
                assert result is not None
                pair[side] = result
        if len(pair) == 2:
            yield [f"sweep {shape}/{length} b{bs}: lmctl vs TRL",
                   f"{pair['lmctl'].tokens_per_s:,.0f} vs {pair['TRL'].tokens_per_s:,.0f} tok/s",
                   f"{pair['lmctl'].tokens_per_s / pair['TRL'].tokens_per_s:.2f}x",
                   f"peak {_gb(pair['lmctl'].peak_bytes)} vs {_gb(pair['TRL'].peak_bytes)}"]


def shape_rows(b: Bench, shapes: dict[str, tuple[int, int]], liger: bool) -> Any:
    """lmctl and TRL at each shape (length, batch), without and with Liger: tokens/s, peak, MFU, goals."""
    from transformers import AutoConfig

    for shape, (length, batch) in shapes.items():
        config = AutoConfig.from_pretrained(b.model(shape))
        per_token = flops_per_token(config, length)
        got: dict[tuple[str, bool], RunResult] = {}
        for with_liger in (False, True) if liger else (False,):
            for side in ("lmctl", "TRL"):
                label = f"train {shape}/{length} b{batch} {side}{' + Liger' if with_liger else ''}"
                result, failed = _try(label, lambda s=side, w=with_liger: b.run(s, shape, length, batch, liger=w))
                if failed:
                    yield failed
                    continue
                assert result is not None
                got[(side, with_liger)] = result
                mfu = result.tokens_per_s * per_token / b.peak_flops if b.peak_flops else 0.0
                yield [label, f"{result.tokens_per_s:,.0f} tok/s", f"peak {_gb(result.peak_bytes)}", f"MFU {mfu:.1%}"]
        yield from _goals(b, shape, length, got, per_token)
        if not liger:
            yield [f"train {shape}: + Liger", "n/a: liger_kernel not importable", "", ""]


def _goals(b: Bench, shape: str, length: int, got: dict[tuple[str, bool], RunResult], per_token: float) -> Any:
    def verdict(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    plain = (got.get(("lmctl", False)), got.get(("TRL", False)))
    if plain[0] and plain[1]:
        speed = plain[0].tokens_per_s / plain[1].tokens_per_s
        memory = plain[0].peak_bytes / plain[1].peak_bytes if plain[1].peak_bytes else float("nan")
        yield [f"goal {shape}: >= 1.2x TRL tok/s at <= 0.7x its peak (no Liger)", f"{speed:.2f}x tok/s",
               f"{memory:.2f}x peak", verdict(speed >= 1.2 and memory <= 0.7)]
    fused = (got.get(("lmctl", True)), got.get(("TRL", True)))
    if fused[0] and fused[1]:
        speed = fused[0].tokens_per_s / fused[1].tokens_per_s
        yield [f"goal {shape}: >= 1.0x TRL + Liger tok/s", f"{speed:.2f}x tok/s",
               f"{fused[0].peak_bytes / max(1, fused[1].peak_bytes):.2f}x peak", verdict(speed >= 1.0)]
    if shape == "1.5B" and length == 2048:
        best = max((r.tokens_per_s for (side, _), r in got.items() if side == "lmctl"), default=0.0)
        mfu = best * per_token / b.peak_flops if b.peak_flops else 0.0
        yield [f"goal {shape}/{length}: lmctl MFU >= 35%", f"MFU {mfu:.1%}", "best of with/without Liger",
               verdict(mfu >= 0.35)]
