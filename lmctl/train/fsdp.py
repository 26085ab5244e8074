"""`train.distributed: fsdp`: FSDP2 through transformers' Trainer and accelerate.

What lmctl adds to the library path, and why:
- *Where it runs.* accelerate 1.15 builds its FSDP plugin only for accelerator devices
  (`AcceleratorState`: CUDA, XPU, NPU, ...). On a CPU-only machine it drops the plugin and
  the Trainer trains DDP while being told FSDP; torch's own `fully_shard` runs on CPU with
  gloo, the stack above it does not. So `sharding()` refuses FSDP across CPU processes
  (exit 2) instead of letting a run silently be something else, and one process (nothing to
  shard) trains plainly, so one config serves a laptop and a cluster.
- *Not with QLoRA.* FSDP flattens a unit's parameters into one buffer of one dtype; 4-bit
  bitsandbytes weights shard only when loaded with `bnb_4bit_quant_storage` set to the
  compute dtype, and the result needs a GPU run to trust. lmctl does not set it, so
  `lora.quantization: 4bit` with FSDP across processes is refused at pre-flight (exit 2);
  QLoRA trains with DDP, or in one process.
- *The sealed checkpoint.* Under FSDP each rank holds a shard of every LoRA tensor. A sealed
  checkpoint must be the same `adapter_model.safetensors` as a single-process run writes, so
  `full_adapter_state` gathers the trainable tensors, unsharded, onto rank 0 with torch's
  `get_model_state_dict` (a collective: every rank calls it). Frozen base weights are left
  out: gathering them would copy the whole base model to rank 0 for nothing.
"""

from __future__ import annotations

import logging
from typing import Any

from lmctl.config import LmctlConfig
from lmctl.errors import BadInputError, LmctlError

log = logging.getLogger("lmctl.train")


def sharding(cfg: LmctlConfig) -> bool:
    """Whether this run shards with FSDP: asked for, launched by torchrun, on CUDA."""
    import torch

    from lmctl.distributed import launched, world

    if cfg.train.distributed != "fsdp":
        return False
    world_size = world().world_size
    if world_size > 1 and cfg.lora.quantization == "4bit":
        raise BadInputError(
            f"lora.quantization=4bit cannot be sharded with train.distributed=fsdp across {world_size} processes "
            "(lmctl does not load 4-bit weights with the bnb_4bit_quant_storage FSDP needs)",
            hint="set train.distributed=ddp for QLoRA on several GPUs, or lora.quantization=none to shard with fsdp")
    if not torch.cuda.is_available():
        if world_size > 1:
            raise BadInputError(
                f"train.distributed=fsdp needs CUDA GPUs; this machine has none and accelerate "
                f"{_version('accelerate')} would train the {world_size} CPU processes with DDP instead",
                hint="set train.distributed=ddp on CPU")
        log.info("train.distributed=fsdp on one CPU process: nothing to shard, training plainly")
        return False
    if not launched():  # not started by torchrun: the Trainer refuses FSDP alone
        log.info("train.distributed=fsdp in one process without torchrun: nothing to shard, training plainly")
        return False
    return True


def _version(package: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(package)


def trainer_options(cfg: LmctlConfig) -> dict[str, Any]:
    """The TrainingArguments that switch the Trainer to FSDP2.

    Each decoder layer is its own FSDP unit (accelerate's transformer-based wrap reads the
    model's `_no_split_modules`); the Trainer's own checkpoints gather a full state dict.
    `train.gradient_checkpointing` becomes FSDP's own activation checkpointing (the Trainer
    refuses its `gradient_checkpointing` together with FSDP's)."""
    return {
        "fsdp": True,
        "fsdp_config": {
            "version": 2,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "state_dict_type": "FULL_STATE_DICT",
            "reshard_after_forward": True,
            "activation_checkpointing": cfg.train.gradient_checkpointing,
        },
    }


def check_enabled(trainer: Any) -> None:
    """The Trainer really shards: a stack that drops the plugin must not train DDP unnoticed."""
    if not trainer.is_fsdp_enabled:
        raise LmctlError(f"train.distributed=fsdp was set but the Trainer did not enable FSDP "
                         f"(accelerate distributed type {trainer.accelerator.state.distributed_type})")


def full_adapter_state(model: Any) -> dict[str, Any]:
    """The trainable tensors of an FSDP-sharded model, whole, on rank 0's CPU (empty elsewhere).

    A collective: every rank must call it, in the same place."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(model, options=options)
