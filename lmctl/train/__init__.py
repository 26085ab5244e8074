"""`lmctl train`: LoRA fine-tuning with transformers' Trainer and peft.

The run directory `output.dir/run_name` holds the Trainer's own resumable state under
`trainer/` and sealed lmctl checkpoints under `checkpoints/step-NNNNNN`. A file lock on the
run stops two processes from training into the same directory (exit 5).
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from lmctl import __version__, atomic, checkpoint, tokenizer_lock
from lmctl.clock import utc_now, utc_stamp
from lmctl.train import preflight
from lmctl.config import LmctlConfig, config_dump
from lmctl.data.examples import collate
from lmctl.data.packing import collate_packed, packing_is_isolated
from lmctl.errors import BadInputError, BusyError, DataError
from lmctl.train.inputs import TrainData, open_stream, stream_sample, training_tokenizer
from lmctl.train.memory import MemoryEstimate
from lmctl.train.memory import estimate as estimate_memory

log = logging.getLogger("lmctl.train")


class TrainPlan(BaseModel):
    """What a run will do; `--dry-run` stops here, after every input was validated."""

    run_dir: str
    base_model: str
    data_format: str
    train_rows: int
    validation_rows: int
    train_examples: int  # 0 when streaming: a stream is not counted ahead
    train_sequences: int
    packing: bool
    streaming: bool = False
    cache_hit: bool | None = None  # the training data's tokenization came from the cache (None: streaming)
    max_steps: int
    tokens_per_step: int
    resume_from: str | None
    lint: preflight.LintReport
    memory: MemoryEstimate


class TrainResult(BaseModel):
    run_dir: str
    checkpoint: str
    checkpoints: list[str]
    best_checkpoint: str | None
    best_eval_loss: float | None
    stopped_early: bool
    steps: int
    train_loss: float | None
    eval_loss: float | None
    tokens: int
    seconds: float
    tokens_per_s: float
    mlflow_run_id: str
    resumed_from: str | None


def complete_trainer_checkpoints(run_dir: Path) -> list[Path]:
    """Trainer checkpoints whose save finished, newest first.

    The Trainer writes `trainer/checkpoint-N` in place (a kill mid-save leaves a partial
    directory); lmctl seals `checkpoints/step-N` only after that save returned. So a
    Trainer checkpoint counts as complete exactly when its sealed twin exists.
    """
    found = []
    for path in (run_dir / "trainer").glob("checkpoint-*"):
        sealed = checkpoint.sealed_twin(path)
        if sealed and (path / "trainer_state.json").is_file() and checkpoint.is_checkpoint(sealed):
            found.append((int(path.name.removeprefix("checkpoint-")), path))
    return [path for _, path in sorted(found, reverse=True)]


def _resume_point(run_dir: Path, resume: str) -> str | None:
    if resume == "never":
        return None
    if resume == "auto":
        complete = complete_trainer_checkpoints(run_dir)
        return str(complete[0]) if complete else None
    path = Path(resume).expanduser().resolve()
    if not (path / "trainer_state.json").is_file():
        raise BadInputError(f"--resume {resume}: not a Trainer checkpoint (no trainer_state.json)")
    return str(path)


def _archive_previous(run_dir: Path) -> None:
    """`--resume never` on a used run directory: keep the old run, start in a clean one."""
    if run_dir.is_dir() and any(run_dir.iterdir()):
        stamp = utc_stamp()
        archived = run_dir.with_name(f"{run_dir.name}.{stamp}")
        run_dir.rename(archived)
        log.info("previous run moved to %s", archived)


def _libraries() -> dict[str, str]:
    import importlib.metadata as md

    versions = {"python": platform.python_version(), "lmctl": __version__}
    for pkg in ("torch", "transformers", "peft", "accelerate", "datasets", "mlflow-skinny"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return versions


def _lora_config(cfg: LmctlConfig, new_token_ids: list[int] | dict[str, list[int]] | None = None) -> Any:
    from peft import LoraConfig, TaskType

    # "auto" adapts every linear layer inside the transformer blocks (attention and MLP
    # projections) and never the output head: peft's "all-linear" does exactly that for
    # any architecture, which beats a per-architecture name table that goes stale.
    targets = cfg.lora.target_modules
    if targets in ("auto", "all-linear"):
        targets = "all-linear"
    return LoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
        target_modules=targets, task_type=TaskType.CAUSAL_LM, use_dora=cfg.lora.use_dora,
        use_rslora=cfg.lora.use_rslora, modules_to_save=cfg.lora.modules_to_save or None,
        # rows of added tokens are trained and saved with the adapter (tied output rows follow)
        trainable_token_indices=new_token_ids or None,
    )


class _Run:
    """Everything one training run needs, prepared and validated before anything is written."""

    def __init__(self, cfg: LmctlConfig, resume: str) -> None:
        from lmctl.loading import base_config_sha256, model_vocab_size
        from lmctl.modelref import portable_base_id

        if cfg.data.train is None:
            raise DataError("data.train is not set", hint="set it in the config or with --set data.train=PATH")
        preflight.check_hardware(cfg)
        self.cfg = cfg
        self.run_dir = Path(cfg.output.dir) / str(cfg.output.run_name)
        self.base_path, self.tokenizer, self.new_token_ids = training_tokenizer(cfg)
        self.stream: Any = None
        if cfg.data.streaming:
            self.stream, train_fp = open_stream(cfg, self.tokenizer)
            self.train = TrainData(None, cfg, self.tokenizer)
            self.train.examples = stream_sample(self.stream, self.tokenizer)
        else:
            self.train = TrainData(cfg.data.train, cfg, self.tokenizer)
            train_fp = self.train.fingerprint
            if not self.train.examples.examples:
                raise DataError(f"{cfg.data.train}: no training sequence of at least 2 tokens")
        self.val = TrainData(cfg.data.validation, cfg, self.tokenizer)
        if cfg.train.early_stopping_patience and not self.val.examples.examples:
            raise BadInputError("train.early_stopping_patience needs validation data (data.validation)")
        self.data_info = checkpoint.ManifestData(train=train_fp, validation=self.val.fingerprint)
        vocab_size = model_vocab_size(self.base_path, cfg.model.revision, cfg.model.trust_remote_code)
        # added tokens grow the embedding to the tokenizer's size before training
        self.lint = preflight.lint(self.train.examples, self.tokenizer, max(vocab_size, len(self.tokenizer))
                                   if self.new_token_ids else vocab_size)
        self.base_info = checkpoint.BaseModelInfo(
            id=portable_base_id(cfg.model.base, self.base_path), revision=cfg.model.revision,
            config_sha256=base_config_sha256(self.base_path, cfg.model.revision, cfg.model.trust_remote_code),
        )
        self.resume_from = _resume_point(self.run_dir, resume)
        if self.resume_from:
            tokenizer_lock.check_resume_tokenizer(Path(self.resume_from), self.tokenizer)
        per_step = cfg.train.batch_size * cfg.train.grad_accum
        sequences = len(self.train.rows_for(cfg.data.packing))
        val_fp = self.val.fingerprint
        self.plan = TrainPlan(
            run_dir=str(self.run_dir), base_model=self.base_path, data_format=train_fp.format,
            train_rows=train_fp.rows, validation_rows=val_fp.rows if val_fp else 0,
            train_examples=0 if self.stream is not None else len(self.train.examples.examples), train_sequences=sequences,
            packing=cfg.data.packing, streaming=cfg.data.streaming, cache_hit=self.train.hit,
            max_steps=_max_steps(cfg, sequences),
            tokens_per_step=per_step * cfg.data.max_length, resume_from=self.resume_from, lint=self.lint,
            memory=estimate_memory(
                self.base_path, _lora_config(cfg, self.new_token_ids), 4 if cfg.model.dtype in ("auto", "float32") else 2,
                cfg.train.batch_size, cfg.data.max_length, cfg.train.gradient_checkpointing, cfg.model.trust_remote_code,
                data_bytes=self.train.memory_bytes + self.val.memory_bytes,
            ),
        )

    def train_dataset(self, packing: bool) -> Any:
        return self.stream if self.stream is not None else self.train.rows_for(packing)

    def export(self, model: Any, step: int, metrics: dict[str, Any], run_id: str) -> Path:
        final = checkpoint.step_dir(self.run_dir, step)
        with atomic.staging_dir(final) as stage:
            # added tokens' rows are in the trainable-tokens delta; the full matrices need not be saved
            model.save_pretrained(stage, safe_serialization=True, save_embedding_layers=False)
            self.tokenizer.save_pretrained(stage)
            checkpoint.seal(stage, {
                "created_at": utc_now(),
                "lmctl_version": __version__,
                "tokenizer": tokenizer_lock.tokenizer_fingerprint(self.tokenizer, stage),
                "base_model": self.base_info,
                "data": self.data_info,
                "config": config_dump(self.cfg),
                "training": checkpoint.TrainingInfo(step=step, mlflow_run_id=run_id, **metrics),
                "libraries": _libraries(),
            })
        log.info("checkpoint written: %s", final)
        return final

    def prune(self, best_step: int | None) -> None:
        """Keep the newest `keep_last` sealed checkpoints plus the best one, as the Trainer does."""
        keep = self.cfg.train.keep_last
        if keep is None:
            return
        for step in checkpoint.sealed_steps(self.run_dir)[:-keep]:
            if step != best_step:
                shutil.rmtree(checkpoint.step_dir(self.run_dir, step))


def _max_steps(cfg: LmctlConfig, sequences: int) -> int:
    per_step = cfg.train.batch_size * cfg.train.grad_accum
    return cfg.train.max_steps or max(1, int(sequences * cfg.train.epochs / per_step))


def _training_args(cfg: LmctlConfig, run: _Run, sequences: int, packing: bool) -> Any:
    import torch
    from transformers import TrainingArguments

    has_val = bool(run.val.examples.examples)
    return TrainingArguments(
        output_dir=str(run.run_dir / "trainer"),
        max_steps=_max_steps(cfg, sequences),
        per_device_train_batch_size=cfg.train.batch_size,
        per_device_eval_batch_size=cfg.train.batch_size,
        gradient_accumulation_steps=cfg.train.grad_accum,
        learning_rate=cfg.train.lr,
        lr_scheduler_type="cosine",
        # a ratio on purpose: transformers 5 dropped `warmup_ratio` and reads a warmup_steps below 1
        # as a share of the total steps (TrainingArguments.get_warmup_steps: ceil(total x ratio));
        # train.warmup_ratio is validated to lie in [0, 1), so it is never taken as a step count
        warmup_steps=cfg.train.warmup_ratio,
        weight_decay=cfg.train.weight_decay,
        seed=cfg.train.seed,
        data_seed=cfg.train.seed,
        logging_steps=cfg.train.log_every,
        eval_strategy="steps" if has_val else "no",
        eval_steps=cfg.train.eval_every if has_val else None,
        save_strategy="steps",
        save_steps=cfg.train.save_every,
        save_total_limit=cfg.train.keep_last,
        metric_for_best_model="eval_loss" if has_val else None,
        greater_is_better=False if has_val else None,
        report_to="none",
        disable_tqdm=True,
        # packed rows carry no attention mask; their only padding is the short tail of each row
        include_num_input_tokens_seen="all" if packing else "non_padding",
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available() and cfg.model.dtype in ("auto", "bfloat16"),
        fp16=torch.cuda.is_available() and cfg.model.dtype == "float16",
        gradient_checkpointing=cfg.train.gradient_checkpointing,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # every LoRA parameter takes part in each forward
    )


def _last_metrics(history: list[dict[str, Any]]) -> dict[str, Any]:
    train = [h["loss"] for h in history if "loss" in h]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    return {"train_loss": train[-1] if train else None, "eval_loss": evals[-1] if evals else None}


def _packing_works(model: Any, run: _Run) -> bool:
    """Probe the real model once: packed examples must not see each other."""
    model.eval()
    isolated = packing_is_isolated(model, len(run.tokenizer))
    model.train()
    if not isolated:
        log.warning("warning: this architecture leaks attention across packed examples; training with padding")
    return isolated


def train(cfg: LmctlConfig, resume: str = "auto", dry_run: bool = False) -> TrainResult | TrainPlan:
    """Validate everything, then fine-tune; returns the plan on --dry-run, else the result."""
    from filelock import FileLock, Timeout

    run = _Run(cfg, resume)
    if dry_run:
        return run.plan
    if not is_primary():  # torchrun: rank 0 holds the run lock and archives for all ranks
        return _fit(cfg, run)
    run.run_dir.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(run.run_dir.parent / f".{run.run_dir.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise BusyError(f"run {run.run_dir} is being trained by another process") from None
    try:
        if resume == "never":
            _archive_previous(run.run_dir)
        return _fit(cfg, run)
    finally:
        lock.release()


def is_primary() -> bool:
    """True on the one process that writes: rank 0 under torchrun, the only process otherwise."""
    return int(os.environ.get("RANK", "0")) == 0


def _build_model(cfg: LmctlConfig, run: _Run) -> Any:
    from peft import get_peft_model

    from lmctl.loading import load_base_model

    base = load_base_model(run.base_path, cfg.model.dtype, cfg.model.trust_remote_code, cfg.model.revision,
                           quantize_4bit=cfg.lora.quantization == "4bit")
    if cfg.lora.quantization == "4bit":
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=cfg.train.gradient_checkpointing)
    if len(run.tokenizer) > base.get_input_embeddings().num_embeddings:
        base.resize_token_embeddings(len(run.tokenizer), mean_resizing=False)
    model = get_peft_model(base, _lora_config(cfg, tokenizer_lock.token_indices(base, cfg.lora.modules_to_save, run.new_token_ids)))
    tokenizer_lock.check_rows_saved(model, run.tokenizer, run.new_token_ids)
    model.config.use_cache = False  # a KV cache is useless in training and disables packed attention masks
    return model


def _fit(cfg: LmctlConfig, run: _Run) -> TrainResult:
    from transformers import EarlyStoppingCallback, PrinterCallback, Trainer, set_seed

    from lmctl.train.callbacks import ExportCheckpoints, Progress, Tracking

    set_seed(cfg.train.seed)
    run.run_dir.mkdir(parents=True, exist_ok=True)
    model = _build_model(cfg, run)
    packing = cfg.data.packing and _packing_works(model, run)
    if run.stream is not None and packing != cfg.data.packing:
        raise BadInputError("this architecture cannot isolate packed examples; set data.packing=false to stream")
    train_rows = run.train_dataset(packing)
    tracking = Tracking(cfg, run.data_info, primary=is_primary())

    def export(model: Any, state: Any) -> Path:
        path = run.export(model, state.global_step, _last_metrics(state.log_history), tracking.run_id)
        run.prune(state.best_global_step)
        return path

    exporter = ExportCheckpoints(export)
    callbacks = [*tracking.callbacks(), Progress(), exporter]
    if cfg.train.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(cfg.train.early_stopping_patience, cfg.train.early_stopping_threshold))
    trainer = Trainer(
        model=model,
        args=_training_args(cfg, run, len(train_rows) if run.stream is None else 0, packing),
        train_dataset=train_rows,
        eval_dataset=run.val.rows_for(packing) if run.val.examples.examples else None,
        data_collator=lambda rows: (collate_packed if packing else collate)(rows, run.tokenizer.pad_token_id),
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # it print()s log dicts to stdout, which --json owns
    started = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=run.resume_from)
    except BaseException:
        tracking.finish("KILLED")
        raise
    seconds = time.perf_counter() - started
    history, step = trainer.state.log_history, trainer.state.global_step
    final = checkpoint.step_dir(run.run_dir, step)
    if is_primary() and not checkpoint.is_checkpoint(final):
        exporter.exported.append(run.export(model, step, _last_metrics(history), tracking.run_id))
    tracking.finish("FINISHED", history, run.run_dir)
    return _result(run, trainer.state, final, exporter.exported, seconds, tracking.run_id)


def _result(run: _Run, state: Any, final: Path, exported: list[Path], seconds: float, run_id: str) -> TrainResult:
    metrics = _last_metrics(state.log_history)
    tokens = int(state.num_input_tokens_seen or 0)
    best = state.best_global_step
    best_dir = checkpoint.step_dir(run.run_dir, best) if best else None
    return TrainResult(
        run_dir=str(run.run_dir), checkpoint=str(final),
        checkpoints=[str(p) for p in exported if checkpoint.is_checkpoint(p)],
        best_checkpoint=str(best_dir) if best_dir and checkpoint.is_checkpoint(best_dir) else None,
        best_eval_loss=state.best_metric, stopped_early=state.global_step < state.max_steps,
        steps=state.global_step, train_loss=metrics["train_loss"], eval_loss=metrics["eval_loss"], tokens=tokens,
        seconds=round(seconds, 3), tokens_per_s=round(tokens / seconds, 1) if seconds else 0.0,
        mlflow_run_id=run_id, resumed_from=run.resume_from,
    )
