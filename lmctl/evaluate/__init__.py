"""`lmctl eval`: measure a MODEL_REF on a data file and write a versioned JSON report."""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from lmctl import data
from lmctl.checkpoint import write_json_atomic
from lmctl.errors import BadInputError

log = logging.getLogger("lmctl.eval")
REPORT_SCHEMA = "lmctl.eval/1"
Method = Literal["strided", "rolling"]


class EvalReport(BaseModel):
    schema_version: str = REPORT_SCHEMA
    model: str
    model_kind: str
    registry: dict[str, str] | None
    data: dict[str, object]
    method: dict[str, object]
    perplexity: float
    metrics: dict[str, float]
    sums: dict[str, float | int]
    seconds: float
    created_at: str
    documents: list[dict[str, float | int]] | None = None


def _model_max_length(model: object) -> int:
    config = getattr(model, "config", None)
    return int(getattr(config, "max_position_embeddings", 0) or 2048)


def _per_document(texts: list[str], doc_nll: list[float], tokenizer: object) -> list[dict[str, float | int]]:
    """Sums and perplexity of each document, in file order, so results can be paired or re-aggregated."""
    import math

    counts = tokenizer(texts, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    rows = []
    for i, (text, nll, ids) in enumerate(zip(texts, doc_nll, counts)):
        n = max(len(ids), 1)
        rows.append({"index": i, "tokens": len(ids), "bytes": len(text.encode("utf-8")), "nll_sum": nll,
                     "perplexity": math.exp(nll / n)})
    return rows


def evaluate(
    ref: str, data_path: Path, method: Method = "strided", max_length: int | None = None,
    stride: int | None = None, batch_size: int = 8, text_field: str = "text", report: Path | None = None,
    per_document: bool = False,
) -> EvalReport:
    """Perplexity of `ref` on `data_path`; the report is also written to `report` when given."""
    from lmctl.evaluate.perplexity import perplexity
    from lmctl.loading import load_for_inference
    from lmctl.modelref import resolve

    if max_length is not None and max_length < 2:
        raise BadInputError("--max-length must be at least 2")
    resolved = resolve(ref)
    texts = data.load_texts(data_path, text_field)
    loaded = load_for_inference(resolved)
    length = min(max_length or 1024, _model_max_length(loaded.model))
    step = length if method == "rolling" else (stride or length // 2)
    if method == "rolling" and stride not in (None, length):
        raise BadInputError("--stride cannot be set with --method rolling (its stride is --max-length)")
    started = time.perf_counter()
    sums, doc_nll = perplexity(loaded.model, loaded.tokenizer, texts, length, step, batch_size)
    seconds = time.perf_counter() - started
    metrics = sums.metrics
    result = EvalReport(
        model=ref, model_kind=resolved.kind,
        registry={"name": resolved.registry_name, "version": resolved.registry_version} if resolved.registry_name else None,
        data=data.fingerprint(data_path, text_field, len(texts)).model_dump(),
        method={"name": method, "max_length": length, "stride": step, "prefix_token": "bos, else eos", "batch_size": batch_size},
        perplexity=metrics["perplexity"], metrics=metrics, sums=sums.model_dump(), seconds=round(seconds, 3),
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        documents=_per_document(texts, doc_nll, loaded.tokenizer) if per_document else None,
    )
    log.info("perplexity %.4f over %d tokens (%.1f s)", result.perplexity, sums.tokens, seconds)
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(report, result.model_dump(mode="json"))
    return result
