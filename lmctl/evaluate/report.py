"""Human-readable eval reports: a Markdown summary and a self-contained HTML page with plots
(perplexity vs. baseline with its 95% interval, per-suite scores, latency distribution).
Plots are PNGs inlined as base64, so the HTML file is one file to attach or mail.
The HTML page renders the Markdown summary with markdown-it-py (already installed: rich
depends on it), CommonMark plus GFM tables, raw HTML off, so every value is escaped.
"""

from __future__ import annotations

import base64
import html
import io
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmctl.evaluate.schema import EvalReport


def markdown(report: EvalReport) -> str:
    lines = [f"# Eval report: `{report.model}`", "",
             f"- data: `{report.data.path}` ({report.data.rows} documents, sha256 `{report.data.sha256[:16]}`)",
             f"- method: {report.method.name}, window {report.method.max_length}, stride {report.method.stride}",
             "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.6g} |" for k, v in report.metrics.items()]
    if report.comparison:
        c = report.comparison
        lines += ["", f"## Against `{report.baseline.model}`", "",
                  f"{c.metric}: candidate {c.candidate:.4f}, baseline {c.baseline:.4f}, difference {c.difference:+.4f} "
                  f"(95% paired bootstrap interval {c.ci95[0]:+.4f} .. {c.ci95[1]:+.4f}; {c.regression_pct:+.2f}%)"]
    if report.suites:
        lines += ["", "## Suites", "", "| suite | items | score | incorrect rate | safety violations |", "|---|---|---|---|---|"]
        lines += [f"| {s.name} | {s.items} | {s.score:.3f} | {'' if s.incorrect_rate is None else f'{s.incorrect_rate:.3f}'} "
                  f"| {s.safety_violations} |" for s in report.suites]
    if report.latency:
        lat = report.latency
        lines += ["", "## Latency", "",
                  f"{lat.runs} requests, {lat.prompt_tokens} prompt + {lat.output_tokens} output tokens: "
                  f"p50 {lat.latency_ms['p50']:.1f} ms, p95 {lat.latency_ms['p95']:.1f} ms, p99 {lat.latency_ms['p99']:.1f} ms; "
                  f"time to first token p50 {lat.ttft_ms['p50']:.1f} ms; {lat.decode_tokens_per_s:.1f} tokens/s"]
    if report.lm_eval:
        lines += ["", "## lm-eval-harness", "", "| task | metric | value |", "|---|---|---|"]
        lines += [f"| {task} | {k} | {v:.6g} |" for task, values in report.lm_eval.items() for k, v in values.items()
                  if isinstance(v, (int, float))]
    if report.gates:
        lines += ["", "## Gates", "", "| gate | threshold | measured | result |", "|---|---|---|---|"]
        lines += [f"| {g.name} | {g.threshold:.4g} | {g.value:.4g} | {'pass' if g.passed else '**FAIL**'} |" for g in report.gates]
    return "\n".join(lines) + "\n"


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _plots(report: EvalReport) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = []
    fig, ax = plt.subplots(figsize=(5, 3))
    names, values, errors = ["candidate"], [report.perplexity], [[0.0], [0.0]]
    if report.comparison:
        c = report.comparison
        names, values = ["candidate", "baseline"], [c.candidate, c.baseline]
        errors = [[max(0.0, -c.ci95[0] + c.difference), 0.0], [max(0.0, c.ci95[1] - c.difference), 0.0]]
    ax.bar(names, values, yerr=errors, capsize=6, color=["#3b6ea5", "#aaaaaa"][: len(names)])
    ax.set_ylabel(report.comparison.metric if report.comparison else "perplexity")
    plots.append(("Perplexity (error bar: 95% interval of the difference)", _png(fig)))
    if report.suites:
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.barh([s.name for s in report.suites], [s.score for s in report.suites], color="#4f8f5b")
        ax.set_xlim(0, 1)
        ax.set_xlabel("score")
        plots.append(("Suite scores", _png(fig)))
    if report.latency:
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.hist(report.latency.samples_ms, bins=min(20, max(5, len(report.latency.samples_ms))), color="#a5673b")
        ax.axvline(report.latency.latency_ms["p95"], color="black", linestyle="--", label="p95")
        ax.set_xlabel("request latency (ms)")
        ax.legend()
        plots.append(("Latency distribution", _png(fig)))
    return plots


_STYLE = ("body{font-family:sans-serif;max-width:900px;margin:2em auto}"
          "table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #999;padding:.2em .6em;text-align:left}"
          "th{background:#dde6f0}code{overflow-wrap:anywhere}figure{display:inline-block;margin:1em}")


def _markdown_html(text: str) -> str:
    """Markdown to HTML: CommonMark with GFM tables; raw HTML in the text is escaped, never passed through."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).enable("table").render(text)


def html_page(report: EvalReport) -> str:
    """One self-contained HTML page: the Markdown summary rendered (tables as tables), then the plots."""
    figures = "".join(f"<figure><img alt='{html.escape(t)}' src='data:image/png;base64,{b64}'>"
                      f"<figcaption>{html.escape(t)}</figcaption></figure>" for t, b64 in _plots(report))
    return ("<!doctype html><html><head><meta charset='utf-8'><title>lmctl eval report</title>"
            f"<style>{_STYLE}</style></head><body>"
            f"{_markdown_html(markdown(report))}{figures}</body></html>\n")
