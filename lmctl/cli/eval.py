"""`lmctl eval MODEL_REF --data FILE`: flags, defaults and help come from EvalOptions / EvalGates."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from lmctl.cli.fields import option, options_from
from lmctl.cli.output import JsonOpt, TracebackOpt, emit
from lmctl.errors import BadInputError
from lmctl.evaluate.options import EvalGates as G
from lmctl.evaluate.options import EvalOptions as O

_FLAGS = {"suites": "--suite", "lm_eval_tasks": "--lm-eval", "min_scores": "--min-score",
          "max_p95_latency_ms": "--max-p95-latency"}


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


def _sleeping_openmp_waits() -> None:
    """OpenMP workers sleep, not spin, while they wait for each other (unless the user chose).

    libgomp reads this once, when torch is first imported, which is later in this process.
    An eval is a few long forward passes, so a worker that sleeps at a barrier costs it
    nothing measurable; on a shared CPU (CI runners, cron hosts) a spinning worker holds a
    core the straggler it waits for needs: at load 8 on 2 cores, a 120-token forward of
    SmolLM2-135M took 3.4 s with 2 spinning threads, 0.7 s with sleeping ones."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def eval_(
    model_ref: Annotated[str, typer.Argument(metavar="MODEL_REF", help="Checkpoint dir, model dir, models:/NAME/VERSION or models:/NAME@ALIAS.")],
    data: Annotated[Path, typer.Option("--data", help="Text data: .txt, .jsonl, .csv, .parquet.")],
    method: str = option(O, "method"),
    max_length: int | None = option(O, "max_length", "--max-length"),
    stride: int | None = option(O, "stride"),
    batch_size: int | None = option(O, "batch_size", "--batch-size"),
    text_field: str = option(O, "text_field", "--text-field"),
    report: Path | None = option(O, "report"),
    per_document: bool = option(O, "per_document", "--per-document"),
    baseline: str | None = option(O, "baseline"),
    max_ppl_regression: float | None = option(G, "max_ppl_regression", "--max-ppl-regression", metavar="PCT"),
    suite: list[Path] | None = option(O, "suites", "--suite", default=None),
    min_score: list[str] | None = option(G, "min_scores", "--min-score", metavar="SUITE=X", default=None),
    max_safety_violations: int | None = option(G, "max_safety_violations", "--max-safety-violations", metavar="N"),
    latency: bool = option(O, "latency", "--latency"),
    prompt_tokens: int = option(O, "prompt_tokens", "--prompt-tokens"),
    output_tokens: int = option(O, "output_tokens", "--output-tokens"),
    latency_runs: int = option(O, "latency_runs", "--latency-runs"),
    max_p95_latency: float | None = option(G, "max_p95_latency_ms", "--max-p95-latency", metavar="MS"),
    markdown: Path | None = option(O, "markdown", "--markdown"),
    html: Path | None = option(O, "html", "--html"),
    log_to_registry: bool = option(O, "log_to_registry", "--log-to-registry"),
    lm_eval: str | None = option(O, "lm_eval_tasks", "--lm-eval", metavar="TASKS", default=None),
    lm_eval_include: Path | None = option(O, "lm_eval_include", "--lm-eval-include"),
    json_out: JsonOpt = False,
    traceback: TracebackOpt = False,
) -> None:
    """Perplexity (token, word, byte; bits per byte) of a model on a data file."""
    from lmctl.evaluate.compare import enforce_gates
    from lmctl.evaluate.run import evaluate

    _sleeping_openmp_waits()

    options = options_from(O, dict(
        method=method, max_length=max_length, stride=stride, batch_size=batch_size, text_field=text_field,
        report=report, per_document=per_document, baseline=baseline, suites=suite or [], latency=latency,
        prompt_tokens=prompt_tokens, output_tokens=output_tokens, latency_runs=latency_runs, markdown=markdown,
        html=html, log_to_registry=log_to_registry, lm_eval_include=lm_eval_include,
        lm_eval_tasks=[t.strip() for t in lm_eval.split(",") if t.strip()] if lm_eval else []), _FLAGS)
    gates = options_from(G, dict(max_ppl_regression=max_ppl_regression, min_scores=_parse_min_scores(min_score or []),
                                 max_safety_violations=max_safety_violations, max_p95_latency_ms=max_p95_latency), _FLAGS)
    result = evaluate(model_ref, data, options, gates)
    emit(result, json_out)  # under torchrun, rank 0 alone prints (cli/output.py)
    enforce_gates(result.gates)
