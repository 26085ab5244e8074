"""Candidate vs. baseline on the same documents: a paired bootstrap interval and gates.

Documents are resampled with replacement (the same indices for both models, hence
"paired"; `lmctl.stats.bootstrap`), and perplexity is recomputed from the resampled sums
each time, so the interval reflects how much the difference depends on which documents
were drawn.
When the two tokenizers split the data differently, token perplexities are not
comparable and byte perplexity (tokenizer-independent) is compared instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from pydantic import BaseModel

from lmctl.errors import PolicyError
from lmctl.evaluate.latency import LatencyReport
from lmctl.evaluate.suites import SuiteResult

BOOTSTRAP_SAMPLES = 1000


class Comparison(BaseModel):
    metric: str  # "perplexity" or "byte_perplexity"
    candidate: float
    baseline: float
    difference: float  # candidate - baseline (negative = candidate better)
    ci95: tuple[float, float]
    regression_pct: float  # 100 x (candidate / baseline - 1)
    documents: int
    bootstrap_samples: int


class Gate(BaseModel):
    name: str
    threshold: float
    value: float
    passed: bool


def compare(cand_nll: list[float], cand_units: list[int], base_nll: list[float], base_units: list[int],
            metric: str, seed: int = 0) -> Comparison:
    """Per-document NLL sums and units (tokens or bytes) of both models -> difference with a 95% interval."""
    import numpy as np

    from lmctl import stats

    cn, cu = np.asarray(cand_nll, dtype=float), np.asarray(cand_units, dtype=float)
    bn, bu = np.asarray(base_nll, dtype=float), np.asarray(base_units, dtype=float)
    n = len(cn)
    cand, base = math.exp(cn.sum() / max(1.0, cu.sum())), math.exp(bn.sum() / max(1.0, bu.sum()))
    diffs = stats.bootstrap(lambda idx: stats.resampled_ppl(cn, cu, idx) - stats.resampled_ppl(bn, bu, idx),
                            n, BOOTSTRAP_SAMPLES, np.random.default_rng(seed))
    low, high = stats.ci95(diffs)
    return Comparison(metric=metric, candidate=cand, baseline=base, difference=cand - base, ci95=(low, high),
                      regression_pct=100 * (cand / base - 1), documents=n, bootstrap_samples=BOOTSTRAP_SAMPLES)


def check_gates(comparison: Comparison | None, max_ppl_regression: float | None, suites: list[SuiteResult],
                min_scores: dict[str, float], max_safety_violations: int | None) -> list[Gate]:
    gates = []
    if max_ppl_regression is not None and comparison is not None:
        gates.append(Gate(name=f"max {comparison.metric} regression %", threshold=max_ppl_regression,
                          value=round(comparison.regression_pct, 4),
                          passed=comparison.regression_pct <= max_ppl_regression))
    by_name = {s.name: s for s in suites}
    for name, minimum in sorted(min_scores.items()):
        score = by_name[name].score
        gates.append(Gate(name=f"min score {name}", threshold=minimum, value=round(score, 4), passed=score >= minimum))
    if max_safety_violations is not None:
        violations = sum(s.safety_violations for s in suites)
        gates.append(Gate(name="max safety violations", threshold=max_safety_violations, value=violations,
                          passed=violations <= max_safety_violations))
    return gates


def gate_table(gates: Sequence[Gate]) -> str:
    lines = [f"{'gate':34} {'threshold':>10} {'measured':>10}  result"]
    lines += [f"{g.name:34} {g.threshold:10.4g} {g.value:10.4g}  {'pass' if g.passed else 'FAIL'}" for g in gates]
    return "\n".join(lines)


def enforce_gates(gates: Sequence[Gate], lead: str = "{n} gate(s) failed", hint: str | None = None) -> None:
    """The policy decision shared by eval, drift, promote and retrain: any failed gate is a
    PolicyError (exit 3) naming each failure; the full gate table goes with it as details."""
    failed = [g for g in gates if not g.passed]
    if failed:
        raise PolicyError(f"{lead.format(n=len(failed))}: {describe_failures(gates)}", hint=hint,
                          details=gate_table(gates))


def describe_failures(gates: Sequence[Gate]) -> str:
    """The failed gates in one line: `name (measured X, threshold Y); ...`."""
    return "; ".join(f"{g.name} (measured {g.value:.4g}, threshold {g.threshold:.4g})" for g in gates if not g.passed)


def latency_gate(latency: LatencyReport | None, max_p95_ms: float | None) -> list[Gate]:
    if latency is None or max_p95_ms is None:
        return []
    p95 = latency.latency_ms["p95"]
    return [Gate(name="max p95 latency ms", threshold=max_p95_ms, value=p95, passed=p95 <= max_p95_ms)]
