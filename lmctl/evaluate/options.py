"""What `lmctl eval` can be told, as two typed objects with help on every field.

`EvalOptions` says what to measure and where to write it; `EvalGates` says what must hold
(a failed gate is exit 3). The CLI takes its flags' defaults and help from these fields;
retrain and tests build them directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Method = Literal["strided", "rolling"]


class EvalOptions(BaseModel):
    """How to measure a model, and which reports to write."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    method: Method = Field("strided", description="strided (overlapping windows) or rolling (disjoint, lm-eval-harness style).")
    max_length: int | None = Field(None, description="Tokens per window (default 1024, capped by the model).")
    stride: int | None = Field(None, ge=1, description="Tokens scored per window with strided (default max-length/2).")
    batch_size: int | None = Field(None, ge=1, description="Windows per forward pass; default: as many as a memory budget allows (384 MiB of activations on CPU, half the free memory on a GPU).")
    text_field: str = Field("text", description="Column with the text in jsonl/csv/parquet.")
    per_document: bool = Field(False, description="Add each document's sums and perplexity.")
    baseline: str | None = Field(None, description="MODEL_REF to compare against on the same data (paired bootstrap).")
    suites: list[Path] = Field(default_factory=list, description="Task suite (YAML or JSONL); repeatable.")
    latency: bool = Field(False, description="Measure generation latency (p50/p95/p99, time to first token, tokens/s).")
    prompt_tokens: int = Field(64, ge=1, description="Prompt length for --latency.")
    output_tokens: int = Field(32, ge=2, description="Generated tokens per request for --latency.")
    latency_runs: int = Field(10, ge=1, description="Requests measured for --latency.")
    lm_eval_tasks: list[str] = Field(default_factory=list, description="lm-eval-harness tasks (local data) folded into the report.")
    lm_eval_include: Path | None = Field(None, description="Directory of lm-eval task YAMLs.")
    report: Path | None = Field(None, description="Also write the JSON report to this file (atomically).")
    markdown: Path | None = Field(None, description="Also write a Markdown summary to this file.")
    html: Path | None = Field(None, description="Also write a self-contained HTML report with plots.")
    log_to_registry: bool = Field(False, description="Attach the reports to the models:/ version's MLflow run and its metrics as tags.")


class EvalGates(BaseModel):
    """Thresholds the report is checked against; none set means no gate."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    max_ppl_regression: float | None = Field(None, description="Gate: fail (exit 3) when perplexity is more than PCT% above the baseline's.")
    min_scores: dict[str, float] = Field(default_factory=dict, description="Gate: suite score at least X (0-1); repeatable.")
    max_safety_violations: int | None = Field(None, description="Gate: at most N safety violations across suites.")
    max_p95_latency_ms: float | None = Field(None, description="Gate: p95 request latency at most MS.")
