"""`evaluate()`: load a MODEL_REF, score it on a data file, compare, gate and write the reports.

Under torchrun (docs/distributed.md) every rank loads the model on its own device and
scores its share of the perplexity batches and suite items (lmctl.distributed); rank 0
alone measures latency, builds the report from the gathered numbers and writes it, and
every rank returns that same report.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from lmctl import data, distributed
from lmctl.atomic import write_text_atomic
from lmctl.clock import utc_now
from lmctl.checkpoint import DataFingerprint
from lmctl.data.sources import resolve as resolve_data
from lmctl.errors import BadInputError
from lmctl.evaluate.compare import Comparison, check_gates, compare, latency_gate
from lmctl.evaluate.latency import LatencyReport
from lmctl.evaluate.latency import measure as measure_latency
from lmctl.evaluate.options import EvalGates, EvalOptions, Method
from lmctl.evaluate.perplexity import PerplexitySums
from lmctl.evaluate.schema import BaselineSummary, EvalMethod, EvalReport, ModelIdentity, RegistryRef
from lmctl.evaluate.suites import Suite, SuiteResult, load_suite, run_suite
from lmctl.modelref import ResolvedRef

log = logging.getLogger("lmctl.eval")


def _model_max_length(model: object) -> int:
    config = getattr(model, "config", None)
    return int(getattr(config, "max_position_embeddings", 0) or 2048)


def _per_document(doc_bytes: list[int], doc_nll: list[float], doc_tokens: list[int]) -> list[dict[str, float | int]]:
    """Sums and perplexity of each document, in file order, so results can be paired or re-aggregated."""
    import math

    return [{"index": i, "tokens": n, "bytes": size, "nll_sum": nll, "perplexity": math.exp(nll / max(n, 1))}
            for i, (size, nll, n) in enumerate(zip(doc_bytes, doc_nll, doc_tokens))]


@dataclass(frozen=True)
class _Data:
    """The eval data as read before any model loads: a small .jsonl's texts, else only its path."""

    path: Path
    text_field: str
    texts: list[str] | None


class _Measured(BaseModel):
    resolved: ResolvedRef
    data: DataFingerprint
    doc_bytes: list[int]
    sums: PerplexitySums
    doc_nll: list[float]
    doc_tokens: list[int]
    batch_size: int
    seconds: float
    suites: list[SuiteResult] = []
    latency: LatencyReport | None = None


def _measure(ref: str, source: _Data, length: int | None, method: Method, stride: int | None,
             batch_size: int | None, world: distributed.World, suites: list[Suite] = (),  # type: ignore[assignment]
             latency: tuple[int, int, int] | None = None) -> tuple[_Measured, int, int]:
    """Load `ref` (verified), score the data's documents (tokenized by this model's tokenizer,
    through the tokenization cache unless the file is small); returns the measurement and the
    window/stride used. Every rank of `world` returns the whole measurement; latency is
    measured on rank 0 alone."""
    import gc

    from lmctl.evaluate.inputs import documents
    from lmctl.evaluate.perplexity import score_documents
    from lmctl.loading import load_for_inference
    from lmctl.modelref import resolve

    with world.rank0_first():  # a models:/ reference is downloaded once, by rank 0
        resolved = resolve(ref)
    loaded = load_for_inference(resolved)
    loaded.model.to(distributed.device())
    length = min(length or 1024, _model_max_length(loaded.model))
    step = length if method == "rolling" else (stride or length // 2)
    started = time.perf_counter()
    # The tokenization cache lives under LMCTL_HOME, which may be each node's own disk: the
    # first process of each node fills it and that node's others read it, as training does.
    with world.rank0_first(local=True):
        docs = documents(source.path, source.text_field, loaded.tokenizer, source.texts)
    if docs.hit is not None:
        log.info("documents: tokenization cache %s", "hit" if docs.hit else "miss (now cached)")
    scored = score_documents(loaded.model, loaded.tokenizer, docs, length, step, batch_size, world)
    seconds = time.perf_counter() - started
    suite_results = [run_suite(loaded.model, loaded.tokenizer, suite, world) for suite in suites]
    timing = measure_latency(loaded.model, loaded.tokenizer, docs, *latency) if latency and world.is_rank0 else None
    if latency:
        world.barrier()  # the other ranks start nothing (a baseline) while rank 0 is timed
    del loaded
    gc.collect()  # the next model (a baseline) should not have to share memory with this one
    return _Measured(resolved=resolved, data=docs.fingerprint, doc_bytes=docs.byte_counts,
                     sums=scored.sums, doc_nll=scored.doc_nll, doc_tokens=scored.doc_tokens,
                     batch_size=scored.batch_size,
                     seconds=seconds, suites=suite_results, latency=timing), length, step


def _identity(ref: str, resolved: ResolvedRef) -> ModelIdentity:
    """Which exact model a measurement is about: its registry version and lock-manifest hash,
    so `lmctl promote --eval` can match a report to a version and its baseline."""
    from lmctl.checkpoint import MANIFEST, sha256_file

    path = Path(resolved.path) / MANIFEST
    return ModelIdentity(
        model=ref,
        registry=RegistryRef(name=resolved.registry_name, version=str(resolved.registry_version))
        if resolved.registry_name else None,
        manifest_sha256=sha256_file(path) if resolved.kind == "checkpoint" and path.is_file() else None)


def _comparison(cand: _Measured, base: _Measured) -> Comparison:
    if cand.doc_tokens == base.doc_tokens:
        return compare(cand.doc_nll, cand.doc_tokens, base.doc_nll, base.doc_tokens, "perplexity")
    return compare(cand.doc_nll, cand.doc_bytes, base.doc_nll, cand.doc_bytes, "byte_perplexity")


def _check(ref: str, opts: EvalOptions, gates: EvalGates) -> list[Suite]:
    """Refuse contradictory options before any model is loaded; returns the loaded suites."""
    if opts.max_length is not None and opts.max_length < 2:
        raise BadInputError("--max-length must be at least 2")
    if opts.method == "rolling" and opts.stride is not None and opts.stride != opts.max_length:
        raise BadInputError("--stride cannot be set with --method rolling (its stride is --max-length)")
    if gates.max_ppl_regression is not None and opts.baseline is None:
        raise BadInputError("--max-ppl-regression needs --baseline MODEL_REF")
    if opts.lm_eval_tasks and distributed.world().world_size > 1:
        raise BadInputError("--lm-eval cannot run under torchrun: lm-eval-harness's HF model starts its own "
                            "accelerate processes from the same environment; run it in one process")
    loaded_suites = [load_suite(p) for p in opts.suites]
    unknown = set(gates.min_scores) - {s.name for s in loaded_suites}
    if unknown:
        raise BadInputError(f"--min-score names suites that were not given: {', '.join(sorted(unknown))}")
    return loaded_suites


def evaluate(ref: str, data_path: Path, options: EvalOptions | None = None, gates: EvalGates | None = None) -> EvalReport:
    """Perplexity of `ref` on `data_path` (and of a baseline, compared); the reports named in
    `options` are written too. Gates are evaluated, not enforced: see `enforce_gates`.
    Under torchrun the ranks share the work and rank 0 writes; all return the same report."""
    opts, gates = options or EvalOptions(), gates or EvalGates()
    loaded_suites = _check(ref, opts, gates)
    # a small .jsonl is read (and its rows checked) now; anything else is checked as the cache reads it
    texts = data.small_texts(data_path, opts.text_field)
    if texts is None:
        resolve_data(data_path)
    source = _Data(data_path, opts.text_field, texts)
    if opts.log_to_registry and not ref.startswith("models:/"):
        raise BadInputError("--log-to-registry needs a models:/NAME/VERSION or models:/NAME@ALIAS reference")
    if gates.max_p95_latency_ms is not None and not opts.latency:
        raise BadInputError("--max-p95-latency needs --latency")
    latency = (opts.prompt_tokens, opts.output_tokens, opts.latency_runs) if opts.latency else None
    with distributed.process_group() as here:
        cand, length, step = _measure(ref, source, opts.max_length, opts.method, opts.stride, opts.batch_size,
                                      here, loaded_suites, latency)
        base = None
        if opts.baseline is not None:
            base, _, _ = _measure(opts.baseline, source, length, opts.method, step, opts.batch_size, here)
        result = _report(ref, opts, gates, cand, base, length, step) if here.is_rank0 else None
        if result is not None:
            log.info("perplexity %.4f over %d tokens (%.1f s)", result.perplexity, cand.sums.tokens, cand.seconds)
            _write_reports(result, opts.report, opts.markdown, opts.html, opts.log_to_registry)
        return here.from_rank0(result)


def _report(ref: str, opts: EvalOptions, gates: EvalGates, cand: _Measured, base: _Measured | None, length: int,
            step: int) -> EvalReport:
    """The report of a measured candidate (and baseline): comparison, lm-eval tasks, gates."""
    comparison = _comparison(cand, base) if base is not None else None
    base_summary = (BaselineSummary(**_identity(str(opts.baseline), base.resolved).model_dump(), **base.sums.metrics)
                    if base is not None else None)
    lm_eval_results = None
    if opts.lm_eval_tasks:
        from lmctl.evaluate.lm_eval_bridge import run_tasks

        lm_eval_results = run_tasks(cand.resolved, list(opts.lm_eval_tasks), opts.lm_eval_include)
    metrics = cand.sums.metrics
    return EvalReport(
        **_identity(ref, cand.resolved).model_dump(), model_kind=cand.resolved.kind,
        data=cand.data,
        method=EvalMethod(name=opts.method, max_length=length, stride=step, prefix_token="bos, else eos",
                          batch_size=cand.batch_size),
        perplexity=metrics["perplexity"], metrics=metrics, sums=cand.sums.model_dump(), seconds=round(cand.seconds, 3),
        created_at=utc_now(),
        documents=_per_document(cand.doc_bytes, cand.doc_nll, cand.doc_tokens) if opts.per_document else None,
        baseline=base_summary, comparison=comparison, suites=cand.suites, latency=cand.latency, lm_eval=lm_eval_results,
        gates=check_gates(comparison, gates.max_ppl_regression, cand.suites, gates.min_scores, gates.max_safety_violations)
        + latency_gate(cand.latency, gates.max_p95_latency_ms),
    )


def _write_reports(result: EvalReport, json_path: Path | None, markdown_path: Path | None, html_path: Path | None,
                   log_to_registry: bool) -> None:
    """Write the requested report files (each atomically) and attach them to the registry version."""
    import tempfile

    from lmctl.evaluate.report import html_page, markdown

    outputs = {"report.json": (json_path, lambda: json.dumps(result.model_dump(mode="json"), indent=2) + "\n"),
               "report.md": (markdown_path, lambda: markdown(result)),
               "report.html": (html_path, lambda: html_page(result))}
    staging = Path(tempfile.mkdtemp(prefix="lmctl-eval-")) if log_to_registry else None
    for name, (path, render) in outputs.items():
        if path is None and staging is None:
            continue
        text = render()
        if path is not None:
            write_text_atomic(path, text)
        if staging is not None:
            (staging / name).write_text(text, encoding="utf-8")
    if staging is not None and result.registry:
        from lmctl import versions

        versions.attach_eval(result.registry.name, result.registry.version, staging, result.metrics)


