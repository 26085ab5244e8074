"""A training run prepared and validated before anything is written: `--dry-run` stops here.

`PlannedRun` loads the tokenizer, reads (or streams) the data through the tokenization
cache, runs the pre-flight lint, finds the resume point and estimates memory; it also seals
the Trainer's saves into lmctl checkpoints (`seal`) and prunes them as the Trainer does.
"""

from __future__ import annotations

import logging
import platform
import shutil
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from lmctl import __version__, atomic, checkpoint, tokenizer_lock
from lmctl.clock import utc_now, utc_stamp
from lmctl.config import LmctlConfig, config_dump
from lmctl.device import Device, resolve_dtype, this_device
from lmctl.errors import BadInputError, DataError
from lmctl.train import preflight
from lmctl.train.inputs import TrainData, open_stream, stream_sample, training_tokenizer
from lmctl.train import gated_mlp, memory
from lmctl.train.memory import MemoryEstimate

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
    tokens_per_step: int  # at most: rows per step of every process x max_length
    world_size: int = 1  # torchrun's world size
    distributed: str = "none"  # none (one process), ddp or fsdp: what training will run
    resume_from: str | None
    lint: preflight.LintReport
    memory: MemoryEstimate


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


def resume_after_restart(run_dir: Path, resume: str) -> str:
    """torchrun --max-restarts starts the workers again with the same arguments: a restart
    continues from this run's newest complete checkpoint, whatever --resume said at first
    (`never` must not archive the progress the first attempt made)."""
    from lmctl.distributed import restart_count

    if resume == "auto" or not restart_count():
        return resume
    newest = complete_trainer_checkpoints(run_dir)
    chosen = str(newest[0]) if newest else ("auto" if resume == "never" else resume)
    log.warning("restarted by torchrun: --resume %s becomes %s", resume, chosen)
    return chosen


def resume_point(run_dir: Path, resume: str) -> str | None:
    if resume == "never":
        return None
    if resume == "auto":
        complete = complete_trainer_checkpoints(run_dir)
        return str(complete[0]) if complete else None
    path = Path(resume).expanduser().resolve()
    if not (path / "trainer_state.json").is_file():
        raise BadInputError(f"--resume {resume}: not a Trainer checkpoint (no trainer_state.json)")
    return str(path)


def archive_previous(run_dir: Path) -> None:
    """`--resume never` on a used run directory: keep the old run, start in a clean one."""
    if run_dir.is_dir() and any(run_dir.iterdir()):
        stamp = utc_stamp()
        archived = run_dir.with_name(f"{run_dir.name}.{stamp}")
        run_dir.rename(archived)
        log.info("previous run moved to %s", archived)


def libraries() -> dict[str, str]:
    import importlib.metadata as md

    versions = {"python": platform.python_version(), "lmctl": __version__}
    for pkg in ("torch", "transformers", "peft", "accelerate", "datasets", "mlflow-skinny"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return versions


def lora_config(cfg: LmctlConfig, new_token_ids: list[int] | dict[str, list[int]] | None = None) -> Any:
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


class PlannedRun:
    """Everything one training run needs, prepared and validated before anything is written."""

    def __init__(self, cfg: LmctlConfig, resume: str, fsdp: bool | None = None) -> None:
        """`fsdp`: whether FSDP takes effect (lmctl.train.fsdp.sharding; decided here when None)."""
        from lmctl.distributed import world
        from lmctl.loading import base_config_sha256, model_vocab_size
        from lmctl.modelref import portable_base_id
        from lmctl.train.fsdp import sharding

        if cfg.data.train is None:
            raise DataError("data.train is not set", hint="set it in the config or with --set data.train=PATH")
        self.device = training_device()
        self.dtype = resolve_dtype(cfg.model.dtype, self.device)
        preflight.check_hardware(cfg, self.device)
        self.cfg = cfg
        self.world_size, self.fsdp = world().world_size, sharding(cfg) if fsdp is None else fsdp
        self.run_dir = Path(cfg.output.dir) / str(cfg.output.run_name)
        self.resume = resume_after_restart(self.run_dir, resume)
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
        self.resume_from = resume_point(self.run_dir, self.resume)
        if self.resume_from:
            tokenizer_lock.check_resume_tokenizer(Path(self.resume_from), self.tokenizer)
        sequences = len(self.train.rows_for(cfg.data.packing))
        val_fp = self.val.fingerprint
        self.plan = TrainPlan(
            run_dir=str(self.run_dir), base_model=self.base_path, data_format=train_fp.format,
            train_rows=train_fp.rows, validation_rows=val_fp.rows if val_fp else 0,
            train_examples=0 if self.stream is not None else len(self.train.examples.examples), train_sequences=sequences,
            packing=cfg.data.packing, streaming=cfg.data.streaming, cache_hit=self.train.hit,
            max_steps=total_steps(cfg, sequences, self.world_size),
            tokens_per_step=rows_per_step(cfg, self.world_size) * cfg.data.max_length, resume_from=self.resume_from,
            world_size=self.world_size, distributed=distributed_mode(self.world_size, self.fsdp), lint=self.lint,
            memory=self._memory_plan(data_bytes=self.train.memory_bytes + self.val.memory_bytes),
        )

    def _memory_plan(self, data_bytes: int) -> MemoryEstimate:
        """The memory plan for this device, in the dtype training will really use (lmctl.train.memory)."""
        cfg = self.cfg
        shape = memory.model_shape(self.base_path, lora_config(cfg, self.new_token_ids), cfg.model.trust_remote_code)
        fixed = shape.transforms_logits or bool(self.new_token_ids)
        work = memory.Workload(batch=cfg.train.batch_size, seq=cfg.data.max_length,
                               gradient_checkpointing=cfg.train.gradient_checkpointing,
                               quantize_4bit=cfg.lora.quantization == "4bit", data_bytes=data_bytes,
                               kernel=memory.loss_kernel(cfg.train.kernels, shape, self.device, fixed),
                               fixed_kernel=fixed,
                               recompute_mlp=gated_mlp.recomputes(cfg.train.kernels, cfg.train.gradient_checkpointing),
                               packed=cfg.data.packing)
        return memory.estimate(shape, work, self.dtype, self.device)

    def check_memory(self) -> None:
        """Before weights load: refuse or warn when the plan exceeds what is free (train.memory_check)."""
        memory.check(self.plan.memory, self.cfg.train.memory_check, self.device, self.world_size)

    def train_dataset(self, packing: bool) -> Any:
        return self.stream if self.stream is not None else self.train.rows_for(packing)

    def seal(self, model: Any, step: int, metrics: dict[str, Any], run_id: str,
             weights: dict[str, Any] | None = None) -> Path:
        """Seal step `step`: the adapter (from `weights`, the whole tensors an FSDP run gathered,
        else from the model itself), the tokenizer and `lmctl.json`."""
        final = checkpoint.step_dir(self.run_dir, step)
        with atomic.staging_dir(final) as stage:
            # added tokens' rows are in the trainable-tokens delta; the full matrices need not be saved
            model.save_pretrained(stage, safe_serialization=True, save_embedding_layers=False,
                                  **({"state_dict": weights} if weights is not None else {}))
            self.tokenizer.save_pretrained(stage)
            checkpoint.seal(stage, {
                "created_at": utc_now(),
                "lmctl_version": __version__,
                "tokenizer": tokenizer_lock.tokenizer_fingerprint(self.tokenizer, stage),
                "base_model": self.base_info,
                "data": self.data_info,
                "config": config_dump(self.cfg),
                "training": checkpoint.TrainingInfo(step=step, mlflow_run_id=run_id, **metrics),
                "libraries": libraries(),
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


def training_device() -> Device:
    """This process's device (under torchrun, the GPU of its local rank)."""
    from lmctl.distributed import device

    here = device()
    return this_device(here.index if here.type == "cuda" else None)


def distributed_mode(world_size: int, fsdp: bool) -> str:
    """What training runs as: `none` (one process), `ddp`, or `fsdp` (train.distributed=fsdp taking effect)."""
    return "fsdp" if fsdp else ("ddp" if world_size > 1 else "none")


def rows_per_step(cfg: LmctlConfig, world_size: int) -> int:
    """Rows one optimizer step consumes: every process's batch_size x grad_accum."""
    return cfg.train.batch_size * cfg.train.grad_accum * world_size


def total_steps(cfg: LmctlConfig, sequences: int, world_size: int) -> int:
    return cfg.train.max_steps or max(1, int(sequences * cfg.train.epochs / rows_per_step(cfg, world_size)))


