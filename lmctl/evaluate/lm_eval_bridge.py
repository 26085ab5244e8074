"""Run lm-eval-harness tasks on a MODEL_REF (base model, adapter checkpoint or registry
version) and fold the results into lmctl's report.

lm-eval loads the model itself (`hf` backend, `peft=` for adapters), so the checkpoint is
verified against its lock here first. Tasks must have local data: pass the directory of
task YAMLs with `--lm-eval-include`. lm-eval is an optional dependency (`lmctl[lm-eval]`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from lmctl.errors import BadInputError


def model_args(resolved: Any) -> str:
    """lm-eval's `hf` model_args for a resolved MODEL_REF (adapters via peft=)."""
    from lmctl.modelref import resolve_base, verified_checkpoint

    if resolved.kind != "checkpoint":
        return f"pretrained={resolved.path},dtype=float32"
    base = resolve_base(verified_checkpoint(resolved).manifest.base_model.id)
    return f"pretrained={base},peft={resolved.path},tokenizer={resolved.path},dtype=float32"


def run_tasks(resolved: Any, tasks: list[str], include: Path | None, limit: int | None = None) -> dict[str, dict[str, Any]]:
    if importlib.util.find_spec("lm_eval") is None:
        raise BadInputError("--lm-eval needs lm-eval-harness", hint="pip install 'lm_eval[hf]'")
    if include is not None and not include.is_dir():
        raise BadInputError(f"--lm-eval-include {include}: not a directory")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include) if include else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise BadInputError(f"unknown lm-eval task(s): {', '.join(unknown)}", hint="check --lm-eval-include")
    out = simple_evaluate(model="hf", model_args=model_args(resolved), tasks=tasks, task_manager=manager,
                          batch_size=1, device="cpu" if not _cuda() else "cuda", limit=limit)
    results: dict[str, dict[str, Any]] = {}
    for task, metrics in out["results"].items():
        results[task] = {k.split(",")[0]: v for k, v in metrics.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool) and "_stderr" not in k}
    return results


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
