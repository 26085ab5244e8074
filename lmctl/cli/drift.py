"""`lmctl drift --model MODEL_REF --reference FILE --current FILE`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmctl.cli.output import JsonOpt, TracebackOpt, emit

# threshold flags -> the `drift` config key they override (a flag wins over --config and --set)
_FLAG_KEYS = {"max_ppl_increase": "max_ppl_increase", "max_psi": "max_psi", "max_ks": "max_ks_statistic",
              "max_rare_increase": "max_rare_rate_increase", "min_documents": "min_documents", "alpha": "alpha",
              "embedding_model": "embedding_model"}


def drift(
    model: Annotated[str, typer.Option("--model", metavar="MODEL_REF", help="Checkpoint dir, model dir, models:/NAME/VERSION or models:/NAME@ALIAS.")],
    reference: Annotated[Path, typer.Option("--reference", help="Reference inputs (e.g. the training data): .txt, .jsonl, .csv, .parquet.")],
    current: Annotated[Path, typer.Option("--current", help="Current inputs: a data file or the sample log of `lmctl serve`.")],
    config: Annotated[Path | None, typer.Option("--config", help="Config whose `drift` section holds the thresholds.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a field: drift.key=value (repeatable).")] = None,
    max_ppl_increase: Annotated[float | None, typer.Option("--max-ppl-increase", metavar="PCT", help="Drift when perplexity rises more than PCT% (and significantly).")] = None,
    max_psi: Annotated[float | None, typer.Option("--max-psi", help="Drift when the token-length PSI exceeds this.")] = None,
    max_ks: Annotated[float | None, typer.Option("--max-ks", help="Drift when the token-length KS statistic exceeds this (and significantly).")] = None,
    max_rare_increase: Annotated[float | None, typer.Option("--max-rare-increase", metavar="PP", help="Drift when the rare-token rate exceeds its expectation by PP points.")] = None,
    alpha: Annotated[float | None, typer.Option("--alpha", help="Significance level of all checks together (drift.alpha, default 0.05); a check fails only when significant after the correction and over its threshold.")] = None,
    min_documents: Annotated[int | None, typer.Option("--min-documents", help="Refuse (exit 2) files with fewer documents.")] = None,
    embedding_model: Annotated[Path | None, typer.Option("--embedding-model", help="Local sentence-transformers model directory for embedding drift.")] = None,
    text_field: Annotated[str, typer.Option("--text-field", help="Column with the text in jsonl/csv/parquet.")] = "text",
    max_length: Annotated[int | None, typer.Option("--max-length", help="Tokens per perplexity window (default 1024, capped by the model).")] = None,
    batch_size: Annotated[int | None, typer.Option(
        "--batch-size", min=1, help="Windows per forward pass; default: as many as a memory budget allows.")] = None,
    report: Annotated[Path | None, typer.Option(help="Also write the JSON report to this file (atomically).")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG: token-length and per-document perplexity histograms.")] = None,
    json_out: JsonOpt = False,
    traceback: TracebackOpt = False,
) -> None:
    """Drift of current inputs against a reference: perplexity, token lengths, rare tokens, embeddings.

    Each check is a permutation test over documents; exit 3 when one is significant (after the
    correction) and over its threshold."""
    from lmctl.config import load_config
    from lmctl.evaluate.compare import enforce_gates
    from lmctl.monitor.drift import detect_drift

    flags = {"max_ppl_increase": max_ppl_increase, "max_psi": max_psi, "max_ks": max_ks,
             "max_rare_increase": max_rare_increase, "min_documents": min_documents, "alpha": alpha,
             "embedding_model": embedding_model.resolve() if embedding_model else None}
    overrides = list(set_ or []) + [f"drift.{_FLAG_KEYS[k]}={v}" for k, v in flags.items() if v is not None]
    cfg = load_config(config, overrides).drift
    result = detect_drift(model, reference, current, cfg, text_field=text_field, max_length=max_length,
                          batch_size=batch_size, report=report, plot=plot)
    emit(result, json_out)
    sig = result.significance
    enforce_gates(result.checks, "drift detected", hint=", ".join(
        f"{c.name}: p={c.p_adjusted:.2g} after {sig.correction} over {sig.signals} checks, alpha {sig.alpha}"
        for c in result.checks if not c.passed) or None)
