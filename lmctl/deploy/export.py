"""`lmctl export MODEL_REF --out DIR [--merge]`: hand a model to tools outside lmctl.

Without `--merge` the verified checkpoint is copied as is. With `--merge` the adapter is
merged into the base weights (peft's merge_and_unload) and saved as a plain Hugging Face
directory with the checkpoint's own tokenizer files (special tokens, EOS and chat template
intact) and an `lmctl-export.json` manifest. The merged model is then checked against the
adapter on a probe text: max |logit difference| and the relative perplexity difference
must be within tolerance, or the export is refused (exit 4) and nothing is left behind.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from lmctl import __version__, atomic, checkpoint
from lmctl.clock import utc_now
from lmctl.errors import IntegrityError

PROBE = ("The registry keeps every checkpoint with its tokenizer. A rollback returns the alias to the "
         "previous version.\ndef add(a, b):\n    return a + b\n")
MAX_LOGIT_DIFF = 1e-3  # float32 merge vs. unmerged adapter
MAX_PPL_REL_DIFF = 1e-4


class ExportResult(BaseModel):
    out: str
    merged: bool
    source: str
    files: int
    max_logit_diff: float | None = None
    perplexity_adapter: float | None = None
    perplexity_merged: float | None = None


def _probe(model: Any, tokenizer: Any) -> tuple[Any, float]:
    import torch

    ids = torch.tensor([tokenizer(PROBE)["input_ids"]])
    with torch.inference_mode():
        logits = model(input_ids=ids).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    return logits, math.exp(float(nll))


def export(ref: str, out: Path, merge: bool = False, force: bool = False) -> ExportResult:
    from lmctl.loading import load_checkpoint
    from lmctl.modelref import resolve_checkpoint

    atomic.require_empty_output(out, force)
    verified = resolve_checkpoint(ref, "export takes a checkpoint or registry version")
    if not merge:
        with atomic.staging_dir(out) as stage:
            shutil.copytree(verified.path, stage, dirs_exist_ok=True)
        return ExportResult(out=str(out), merged=False, source=ref, files=len(list(out.iterdir())))
    loaded = load_checkpoint(verified, dtype="float32")
    adapter_logits, adapter_ppl = _probe(loaded.model, loaded.tokenizer)
    merged = loaded.model.merge_and_unload()
    merged_logits, merged_ppl = _probe(merged, loaded.tokenizer)
    diff = float((adapter_logits - merged_logits).abs().max())
    if diff > MAX_LOGIT_DIFF or abs(merged_ppl / adapter_ppl - 1) > MAX_PPL_REL_DIFF:
        raise IntegrityError(f"merged model differs from the adapter: max |logit diff| {diff:.2e} "
                             f"(limit {MAX_LOGIT_DIFF}), perplexity {merged_ppl:.6f} vs {adapter_ppl:.6f}")
    with atomic.staging_dir(out) as stage:
        merged.save_pretrained(stage, safe_serialization=True)
        for name in checkpoint.TOKENIZER_FILES:  # the checkpoint's tokenizer files, byte for byte
            if (verified.path / name).is_file():
                shutil.copy2(verified.path / name, stage / name)
        manifest = verified.manifest
        atomic.write_json_atomic(stage / "lmctl-export.json", {
            "format": "lmctl.export/1", "source": ref, "created_at": utc_now(),
            "lmctl_version": __version__, "source_manifest_sha256": verified.manifest_sha256,
            "base_model": manifest.base_model.model_dump(), "tokenizer": manifest.tokenizer.model_dump(),
            "equivalence": {"max_logit_diff": diff, "perplexity_adapter": adapter_ppl, "perplexity_merged": merged_ppl},
            "files": {k: v.model_dump() for k, v in checkpoint.hash_files(stage).items()},
        })
    return ExportResult(out=str(out), merged=True, source=ref, files=len(list(out.iterdir())),
                        max_logit_diff=diff, perplexity_adapter=adapter_ppl, perplexity_merged=merged_ppl)
