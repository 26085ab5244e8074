"""Fine-tune a prepared run with transformers' Trainer and a peft LoRA adapter.

The run directory `output.dir/run_name` holds the Trainer's own resumable state under
`trainer/` and sealed lmctl checkpoints under `checkpoints/step-NNNNNN`. A file lock on the
run stops two processes from training into the same directory (exit 5).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from lmctl import checkpoint, tokenizer_lock
from lmctl.config import LmctlConfig
from lmctl.data.examples import collate
from lmctl.data.packing import collate_packed, packing_is_isolated
from lmctl.errors import BadInputError, BusyError
from lmctl.train.prepare import PreparedRun, TrainPlan, archive_previous, lora_config, total_steps

log = logging.getLogger("lmctl.train")


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


def training_args(cfg: LmctlConfig, run: PreparedRun, sequences: int, packing: bool) -> Any:
    import torch
    from transformers import TrainingArguments

    has_val = bool(run.val.examples.examples)
    return TrainingArguments(
        output_dir=str(run.run_dir / "trainer"),
        max_steps=total_steps(cfg, sequences),
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


def _packing_works(model: Any, run: PreparedRun) -> bool:
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

    run = PreparedRun(cfg, resume)
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
            archive_previous(run.run_dir)
        return _fit(cfg, run)
    finally:
        lock.release()


def is_primary() -> bool:
    """True on the one process that writes: rank 0 under torchrun, the only process otherwise."""
    return int(os.environ.get("RANK", "0")) == 0


def _build_model(cfg: LmctlConfig, run: PreparedRun) -> Any:
    from peft import get_peft_model

    from lmctl.loading import load_base_model

    base = load_base_model(run.base_path, cfg.model.dtype, cfg.model.trust_remote_code, cfg.model.revision,
                           quantize_4bit=cfg.lora.quantization == "4bit")
    if cfg.lora.quantization == "4bit":
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=cfg.train.gradient_checkpointing)
    if len(run.tokenizer) > base.get_input_embeddings().num_embeddings:
        base.resize_token_embeddings(len(run.tokenizer), mean_resizing=False)
    model = get_peft_model(base, lora_config(cfg, tokenizer_lock.token_indices(base, cfg.lora.modules_to_save, run.new_token_ids)))
    tokenizer_lock.check_rows_saved(model, run.tokenizer, run.new_token_ids)
    model.config.use_cache = False  # a KV cache is useless in training and disables packed attention masks
    return model


def _fit(cfg: LmctlConfig, run: PreparedRun) -> TrainResult:
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
        args=training_args(cfg, run, len(train_rows) if run.stream is None else 0, packing),
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


def _result(run: PreparedRun, state: Any, final: Path, exported: list[Path], seconds: float, run_id: str) -> TrainResult:
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
