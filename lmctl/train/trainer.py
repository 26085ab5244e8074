"""Fine-tune a prepared run with transformers' Trainer and a peft LoRA adapter.

The run directory `output.dir/run_name` holds the Trainer's own resumable state under
`trainer/` and sealed lmctl checkpoints under `checkpoints/step-NNNNNN`. A file lock on the
run stops two processes from training into the same directory (exit 5). Under torchrun
(docs/distributed.md) every rank runs `train`; rank 0 alone writes (lock, archive, MLflow,
sealed checkpoints) and the Trainer (accelerate) trains DDP or FSDP2 across the ranks.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from lmctl import checkpoint, tokenizer_lock
from lmctl.config import LmctlConfig
from lmctl.data.examples import collate
from lmctl.data.packing import collate_packed, packing_is_isolated
from lmctl.distributed import World
from lmctl.errors import BadInputError, BusyError, LmctlError
from lmctl.train import fsdp, gated_mlp, headloss, preflight
from lmctl.train.plan import PlannedRun, TrainPlan, archive_previous, distributed_mode, lora_config, total_steps

if TYPE_CHECKING:
    from lmctl.train.mlflow_worker import Worker
    from lmctl.train.callbacks import MlflowRun

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
    tokens: int  # real tokens trained in this session (padding excluded), all processes
    seconds: float
    tokens_per_s: float  # tokens / seconds: the whole training loop, first steps, evals and saves included
    tokens_per_s_steady: float | None = None  # after the warm-up steps, evals and saves excluded (None: too short)
    mlflow_run_id: str
    resumed_from: str | None
    world_size: int = 1  # torchrun's world size; tokens and tokens_per_s count all of them
    distributed: str = "none"  # none (one process), ddp or fsdp: what the Trainer ran


def training_args(cfg: LmctlConfig, run: PlannedRun, sequences: int) -> Any:
    """The Trainer's arguments; with train.distributed=fsdp under torchrun, FSDP2's (lmctl.train.fsdp).
    Nothing in them syncs the host with the device every step: tokens are counted on the host
    (callbacks.Throughput), and the NaN/Inf filter of the logged loss is off (a diverging loss
    shows as NaN instead of being averaged away)."""
    from transformers import TrainingArguments

    has_val = bool(run.val.examples.examples)
    return TrainingArguments(
        output_dir=str(run.run_dir / "trainer"),
        max_steps=total_steps(cfg, sequences, run.world_size),
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
        include_num_input_tokens_seen="no",  # an .item() per micro-batch; callbacks.Throughput counts instead
        logging_nan_inf_filter=False,  # torch.isnan(loss) per micro-batch is a device sync too
        remove_unused_columns=False,
        use_cpu=not run.device.cuda,
        **preflight.mixed_precision(run.dtype, run.device),
        # under FSDP its own activation checkpointing instead (the Trainer refuses both at once)
        gradient_checkpointing=cfg.train.gradient_checkpointing and not run.fsdp,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # every LoRA parameter takes part in each forward
        **(fsdp.trainer_options(cfg) if run.fsdp else {}),
    )


def _last_metrics(history: list[dict[str, Any]]) -> dict[str, Any]:
    train = [h["loss"] for h in history if "loss" in h]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    return {"train_loss": train[-1] if train else None, "eval_loss": evals[-1] if evals else None}


def _packing_works(model: Any, run: PlannedRun) -> bool:
    """Probe the real model once, on the training device at the training batch and row length
    (where attention kernels differ): packed examples must not see each other."""
    from lmctl.distributed import device

    batch, length = run.cfg.train.batch_size, run.cfg.data.max_length
    if not run.fsdp and run.cfg.lora.quantization == "none":
        model.to(device())  # where the Trainer moves it (FSDP shards it first; QLoRA loads it on the GPU)
    log.debug("packing probe: %d rows of %d tokens on %s", batch, length, next(model.parameters()).device)
    model.eval()
    isolated = packing_is_isolated(model, len(run.tokenizer), batch=batch, length=length)
    model.train()
    if not isolated:
        log.warning("warning: this architecture leaks attention across packed examples; training with padding")
    return isolated


def train(cfg: LmctlConfig, resume: str = "auto", dry_run: bool = False,
          callbacks: Sequence[Any] = ()) -> TrainResult | TrainPlan:
    """Validate everything, then fine-tune; returns the plan on --dry-run, else the result.
    `callbacks` (transformers TrainerCallbacks) join lmctl's own: scripts/gpu_check.py times
    lmctl and TRL with the same one.

    Under torchrun every rank runs this. One process per node (local rank 0) prepares first,
    filling that node's tokenization cache; the others then open the entry it sealed."""
    from lmctl import tracking
    from lmctl.distributed import env_rank, process_group
    from lmctl.train import mlflow_worker

    # rank 0's MLflow process starts first: it imports MLflow and opens the store meanwhile
    worker = None if dry_run or env_rank() != 0 else mlflow_worker.spawn(tracking.tracking_uri(cfg.registry.tracking_uri))
    try:
        fsdp_on = fsdp.sharding(cfg)  # refused before joining the other processes, not after
        with process_group() as here:
            with here.rank0_first(local=True):
                run = PlannedRun(cfg, resume, fsdp_on)
            if dry_run:
                return run.plan
            run.check_memory()  # before any weight is loaded
            with _held_by_rank0(cfg, run, here, worker) as mlflow_run:
                worker = None  # the MLflow run owns it now
                return _fit(cfg, run, here, mlflow_run, callbacks)
    finally:
        if worker is not None:  # refused before the MLflow run took it: end of input ends it
            mlflow_worker.abandon(worker)


@dataclass(frozen=True)
class _Outcome:
    """What rank 0 tells the other ranks before training: go on from `resume_from`, or fail."""

    resume_from: str | None = None
    error: str | None = None
    exit_code: int = 1


@contextlib.contextmanager
def _held_by_rank0(cfg: LmctlConfig, run: PlannedRun, here: World,
                   worker: Worker | None) -> Iterator[MlflowRun]:
    """Rank 0 takes the run lock, archives on --resume never and opens the MLflow run. Every
    rank learns the outcome and rank 0's resume point, so a refusal on rank 0 ends all ranks
    with its exit code instead of leaving them waiting at the first collective."""
    from filelock import FileLock, Timeout

    from lmctl.train.callbacks import MlflowRun

    lock = FileLock(str(run.run_dir.parent / f".{run.run_dir.name}.lock"))
    tracking, outcome = MlflowRun(cfg, run.data_info, None), _Outcome(resume_from=run.resume_from)
    try:
        if here.is_rank0:
            try:
                run.run_dir.parent.mkdir(parents=True, exist_ok=True)
                try:
                    lock.acquire(timeout=0)
                except Timeout:
                    raise BusyError(f"run {run.run_dir} is being trained by another process") from None
                if run.resume == "never":
                    archive_previous(run.run_dir)
                tracking = MlflowRun(cfg, run.data_info, worker)
                if here.world_size > 1:  # the other ranks must hear of a failure now, not at the first step
                    tracking.ready()
            except Exception as exc:  # noqa: BLE001 - told to every rank, then raised here as it was
                here.from_rank0(_Outcome(error=str(exc), exit_code=getattr(exc, "exit_code", 1)))
                raise
        outcome = here.from_rank0(outcome if here.is_rank0 else None)
        if outcome.error is not None:
            failed = LmctlError(f"rank 0 refused the run: {outcome.error}")
            failed.exit_code = outcome.exit_code
            raise failed
        run.resume_from = outcome.resume_from
        try:
            yield tracking
        except BaseException:
            tracking.finish("KILLED")
            raise
    finally:
        if lock.is_locked:
            lock.release()


@functools.cache
def _cpu_ranks_load_on_the_cpu() -> None:
    """Let torch.load read `cpu:N` as the CPU. Under DDP on CPU accelerate gives rank N the
    device `cpu:N`, and transformers 5.17 resumes a run of several processes with
    `torch.load(optimizer.pt, map_location=args.device)`, which torch refuses ("don't know how
    to restore data location ... (tagged with cpu:0)"): every resume on CPU would fail. This
    teaches torch's own location registry (`torch.serialization.register_package`) the name."""
    import torch.serialization

    def restore(storage: Any, location: str) -> Any:
        return storage if location.startswith("cpu:") else None

    torch.serialization.register_package(30, lambda obj: None, restore)


def _build_model(cfg: LmctlConfig, run: PlannedRun) -> Any:
    from peft import get_peft_model

    from lmctl.loading import load_base_model

    base = load_base_model(run.base_path, run.dtype, cfg.model.trust_remote_code, cfg.model.revision,
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


def _fit(cfg: LmctlConfig, run: PlannedRun, here: World, tracking: MlflowRun, extra: Sequence[Any] = ()) -> TrainResult:
    from transformers import EarlyStoppingCallback, PrinterCallback, Trainer, set_seed

    from lmctl.train.callbacks import SealCheckpoints, Progress, Throughput

    set_seed(cfg.train.seed)
    if here.is_rank0:
        run.run_dir.mkdir(parents=True, exist_ok=True)
    model = _build_model(cfg, run)
    packing = cfg.data.packing and _packing_works(model, run)
    headloss.install(model, cfg.train.kernels)  # after the probe: it reads real logits
    if gated_mlp.recomputes(cfg.train.kernels, cfg.train.gradient_checkpointing):
        gated_mlp.install(model)
    if run.stream is not None and packing != cfg.data.packing:
        raise BadInputError("this architecture cannot isolate packed examples; set data.packing=false to stream")
    train_rows = run.train_dataset(packing)

    def seal_step(model: Any, state: Any, weights: dict[str, Any] | None) -> Path:
        path = run.seal(model, state.global_step, _last_metrics(state.log_history), tracking.run_id, weights)
        run.prune(state.best_global_step)
        return path

    sealer, throughput = SealCheckpoints(seal_step, here, run.fsdp), Throughput()
    callbacks = [Progress(), sealer, *extra]
    if cfg.train.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(cfg.train.early_stopping_patience, cfg.train.early_stopping_threshold))
    callbacks.append(throughput)  # last: its clock restarts after the other callbacks' saves

    def collator(rows: list[dict[str, list[int]]]) -> dict[str, Any]:
        throughput.collated(rows)
        return (collate_packed if packing else collate)(rows, run.tokenizer.pad_token_id)
    trainer = Trainer(
        model=model,
        args=training_args(cfg, run, len(train_rows) if run.stream is None else 0),
        train_dataset=train_rows,
        eval_dataset=run.val.rows_for(packing) if run.val.examples.examples else None,
        data_collator=collator,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # it print()s log dicts to stdout, which --json owns
    if run.fsdp:
        fsdp.check_enabled(trainer)
    if here.world_size > 1 and trainer.args.device.type == "cpu":
        _cpu_ranks_load_on_the_cpu()
    for callback in tracking.callbacks():  # the MLflow run, opened meanwhile, before the first step
        trainer.add_callback(callback)
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=run.resume_from)
    final = checkpoint.step_dir(run.run_dir, trainer.state.global_step)
    # the last step was no save step, or this run resumed at its end: seal it unless it is
    sealed = here.from_rank0(checkpoint.is_checkpoint(final) if here.is_rank0 else None)
    if sealer.last_step != trainer.state.global_step and not sealed:
        sealer.seal(model, trainer.state)
    seconds = time.perf_counter() - started
    tracking.finish("FINISHED", trainer.state.log_history, run.run_dir)
    counted = here.all_gather((throughput.tokens, throughput.steady_tokens, throughput.steady_seconds))
    steady_s = max(c[2] for c in counted)
    steady = round(sum(c[1] for c in counted) / steady_s, 1) if steady_s > 0 and throughput.steady_rate else None
    return _result(run, trainer.state, final, sealer.sealed_paths, seconds, tracking.run_id,
                   sum(c[0] for c in counted), steady)


def _result(run: PlannedRun, state: Any, final: Path, sealed_paths: list[Path], seconds: float, run_id: str,
            tokens: int, steady: float | None) -> TrainResult:
    metrics = _last_metrics(state.log_history)
    best = state.best_global_step
    best_dir = checkpoint.step_dir(run.run_dir, best) if best else None
    return TrainResult(
        run_dir=str(run.run_dir), checkpoint=str(final),
        checkpoints=[str(p) for p in sealed_paths if checkpoint.is_checkpoint(p)],
        best_checkpoint=str(best_dir) if best_dir and checkpoint.is_checkpoint(best_dir) else None,
        best_eval_loss=state.best_metric, stopped_early=state.global_step < state.max_steps,
        steps=state.global_step, train_loss=metrics["train_loss"], eval_loss=metrics["eval_loss"], tokens=tokens,
        seconds=round(seconds, 3), tokens_per_s=round(tokens / seconds, 1) if seconds else 0.0,
        tokens_per_s_steady=steady,
        mlflow_run_id=run_id, resumed_from=run.resume_from, world_size=run.world_size,
        distributed=distributed_mode(run.world_size, run.fsdp),
    )
