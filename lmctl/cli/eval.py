"""`lmctl eval MODEL_REF --data FILE`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from lmctl.cli.output import JsonOpt, TracebackOpt, emit
from lmctl.errors import BadInputError, PolicyError


def _parse_min_scores(items: list[str]) -> dict[str, float]:
    scores = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            scores[name] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name:
            raise BadInputError(f"--min-score {item!r}: expected SUITE=X, e.g. python-basics=0.5")
    return scores


def eval_(
    model_ref: Annotated[str, typer.Argument(metavar="MODEL_REF", help="Checkpoint dir, model dir, models:/NAME/VERSION or models:/NAME@ALIAS.")],
    data: Annotated[Path, typer.Option("--data", help="Text data: .txt, .jsonl, .csv, .parquet.")],
    method: Annotated[str, typer.Option(help="strided (overlapping windows) or rolling (disjoint, lm-eval-harness style).")] = "strided",
    max_length: Annotated[int | None, typer.Option("--max-length", help="Tokens per window (default 1024, capped by the model).")] = None,
    stride: Annotated[int | None, typer.Option(help="Tokens scored per window with strided (default max-length/2).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Windows per forward pass.")] = 8,
    text_field: Annotated[str, typer.Option("--text-field", help="Column with the text in jsonl/csv/parquet.")] = "text",
    report: Annotated[Path | None, typer.Option(help="Also write the JSON report to this file (atomically).")] = None,
    per_document: Annotated[bool, typer.Option("--per-document", help="Add each document's sums and perplexity.")] = False,
    baseline: Annotated[str | None, typer.Option(help="MODEL_REF to compare against on the same data (paired bootstrap).")] = None,
    max_ppl_regression: Annotated[float | None, typer.Option("--max-ppl-regression", metavar="PCT", help="Gate: fail (exit 3) when perplexity is more than PCT% above the baseline's.")] = None,
    suite: Annotated[list[Path] | None, typer.Option("--suite", help="Task suite (YAML or JSONL); repeatable.")] = None,
    min_score: Annotated[list[str] | None, typer.Option("--min-score", metavar="SUITE=X", help="Gate: suite score at least X (0-1); repeatable.")] = None,
    max_safety_violations: Annotated[int | None, typer.Option("--max-safety-violations", metavar="N", help="Gate: at most N safety violations across suites.")] = None,
    latency: Annotated[bool, typer.Option("--latency", help="Measure generation latency (p50/p95/p99, time to first token, tokens/s).")] = False,
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", min=1, help="Prompt length for --latency.")] = 64,
    output_tokens: Annotated[int, typer.Option("--output-tokens", min=2, help="Generated tokens per request for --latency.")] = 32,
    latency_runs: Annotated[int, typer.Option("--latency-runs", min=1, help="Requests measured for --latency.")] = 10,
    max_p95_latency: Annotated[float | None, typer.Option("--max-p95-latency", metavar="MS", help="Gate: p95 request latency at most MS.")] = None,
    markdown: Annotated[Path | None, typer.Option("--markdown", help="Also write a Markdown summary to this file.")] = None,
    html: Annotated[Path | None, typer.Option("--html", help="Also write a self-contained HTML report with plots.")] = None,
    log_to_registry: Annotated[bool, typer.Option("--log-to-registry", help="Attach the reports to the models:/ version's MLflow run and its metrics as tags.")] = False,
    lm_eval: Annotated[str | None, typer.Option("--lm-eval", metavar="TASKS", help="Comma-separated lm-eval-harness tasks (local data) folded into the report.")] = None,
    lm_eval_include: Annotated[Path | None, typer.Option("--lm-eval-include", help="Directory of lm-eval task YAMLs.")] = None,
    json_out: JsonOpt = False,
    traceback: TracebackOpt = False,
) -> None:
    """Perplexity (token, word, byte; bits per byte) of a model on a data file."""
    from lmctl.evaluate import evaluate, failed_gates
    from lmctl.evaluate.compare import gate_table

    if method not in ("strided", "rolling"):
        raise BadInputError(f"--method {method!r}: expected strided or rolling")
    result = evaluate(model_ref, data, method=method, max_length=max_length, stride=stride,  # type: ignore[arg-type]
                      batch_size=batch_size, text_field=text_field, report=report, per_document=per_document,
                      baseline=baseline, max_ppl_regression=max_ppl_regression, suites=suite or [],
                      min_scores=_parse_min_scores(min_score or []), max_safety_violations=max_safety_violations,
                      latency=(prompt_tokens, output_tokens, latency_runs) if latency else None,
                      max_p95_latency_ms=max_p95_latency, markdown_path=markdown, html_path=html,
                      log_to_registry=log_to_registry,
                      lm_eval_tasks=[t.strip() for t in lm_eval.split(",") if t.strip()] if lm_eval else [],
                      lm_eval_include=lm_eval_include)
    emit(result, json_out)
    failed = failed_gates(result)
    if failed:
        sys.stderr.write(gate_table(result.gates) + "\n")
        raise PolicyError(f"{len(failed)} gate(s) failed: " + "; ".join(f"{g.name} (measured {g.value:.4g}, threshold {g.threshold:.4g})" for g in failed))
