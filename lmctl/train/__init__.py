"""`lmctl train`: LoRA fine-tuning with transformers' Trainer and peft.

- `plan`: the run validated before anything is written (`TrainPlan`, what `--dry-run` prints);
- `trainer`: the Trainer run, its lock, sealed checkpoints and `TrainResult`;
- `inputs`: a run's data from the tokenization cache; `preflight`: the lint that refuses setups
  that cannot train well; `memory`: the `--dry-run` memory estimate; `callbacks`: MLflow
  tracking, the progress bar and sealing a checkpoint after each Trainer save;
- `fsdp`: `train.distributed: fsdp` (FSDP2 through the Trainer); `launch`: `--nproc-per-node`,
  torchrun's launcher started from `lmctl train` (docs/distributed.md).

The package's names are imported lazily (PEP 562), as lmctl.evaluate's are: `lmctl train --help`
imports `lmctl.train.launch` for the launcher's flags and must not pay for the Trainer's modules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmctl import lazy

if TYPE_CHECKING:
    from lmctl.train.plan import TrainPlan, complete_trainer_checkpoints
    from lmctl.train.trainer import TrainResult, train

_EXPORTS = {"TrainPlan": "plan", "complete_trainer_checkpoints": "plan", "TrainResult": "trainer",
            "train": "trainer"}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy.exports(__name__, _EXPORTS)
