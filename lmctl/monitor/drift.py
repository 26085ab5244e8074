"""`lmctl drift`: are the current (production) inputs still like the reference data?

Each signal is a statistical test with an effect size. A check fails (drift) only when its
p-value, corrected for testing every enabled signal at once (`drift.correction`, Holm by
default), is at most `drift.alpha` AND its effect size exceeds its threshold (the `drift`
config section; null turns a check off). Significance alone would alarm on large samples for
trivial differences; the effect floor alone alarms on small samples for noise (issue 26:
5 of 6 same-source halves did). `drift_detected` is true when any check fails. The tests are
in `lmctl.monitor.signals`: one-sided permutation tests that swap whole documents between
the two sets (`drift.permutations` of them), because tokens within a document are not
independent.

- Perplexity: token-weighted perplexity of the model on each set (strided windows, as in
  docs/evaluation.md "How perplexity is computed"); effect = increase % = 100 x (ppl_current /
  ppl_reference - 1); test: permutation. The report keeps the 95% interval of the increase
  from an unpaired bootstrap over documents.
- Token length (tokens per document, the model's tokenizer, no special tokens): PSI over
  bins at the reference's quantiles (`stats.psi`; test: permutation), and the two-sample KS
  statistic (test: scipy's KS p-value).
- Rare tokens: token ids that occur at most `rare_max_count` times in the reference
  (0 = unseen in the reference). The current rate (share of current tokens that are rare) is
  compared with what a fresh sample of the reference distribution would show, estimated by
  Good-Turing from the reference itself (`stats.rare_token_rates`): `tokens.rare_rate_increase_pp`.
  That gap is biased upwards on small sets, so the check's effect size is the gap minus its
  mean over the permutations (the gap two same-source sets of these sizes show); test: permutation.
- Unknown tokens: share of tokens that are the tokenizer's unk id (byte-level BPE tokenizers
  have none or never emit it, so this is 0 there, p = 1); current minus reference, in points.
- Embeddings (optional): only when `sentence_transformers` is importable and
  `drift.embedding_model` names a local model directory (nothing is downloaded). Cosine
  distance of the mean normalized embeddings, and unbiased MMD^2 (RBF kernel, median
  bandwidth) on at most 1000 seeded-sampled documents per set; test: permutation. Otherwise
  `embedding` is null and `embedding_skipped` says why.

Inputs (a data file or serve's request sample log): `lmctl.monitor.inputs`.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from lmctl import stats
from lmctl.atomic import write_bytes_atomic, write_text_atomic
from lmctl.clock import utc_now
from lmctl.config import DriftConfig
from lmctl.errors import BadInputError
from lmctl.evaluate.compare import Gate
from lmctl.monitor import signals
from lmctl.monitor.inputs import load_input, sample
from lmctl.monitor.signals import Correction, TestResult

log = logging.getLogger("lmctl.drift")
REPORT_SCHEMA = "lmctl.drift/1"
EMBEDDING_MAX_DOCUMENTS = 1000  # MMD holds n x n kernel matrices


class DriftCheck(Gate):
    """A signal: `value` is its effect size and `threshold` the effect floor; it fails (drift)
    when value > threshold and it is significant after the correction."""

    setting: str  # the config key of the threshold, e.g. drift.max_psi
    test: str  # what gave the p-value
    p_value: float  # one-sided, this signal alone
    p_adjusted: float  # after the correction across the report's checks
    significant: bool  # p_adjusted <= alpha
    detail: dict[str, float] = {}


class Significance(BaseModel):
    alpha: float  # family-wise: the chance that any check is significant without drift
    correction: Correction
    signals: int  # the checks corrected for together
    permutations: int


class PerplexityDrift(BaseModel):
    reference: float
    current: float
    increase_pct: float
    ci95: tuple[float, float]
    bootstrap_samples: int
    per_document: dict[str, dict[str, float]]
    max_length: int
    stride: int


class LengthDrift(BaseModel):
    reference: dict[str, float]
    current: dict[str, float]
    psi: float
    psi_bins: int
    ks_statistic: float
    ks_p_value: float


class TokenDrift(BaseModel):
    rare_max_count: int
    rare_rate_expected: float
    rare_rate_current: float
    rare_rate_increase_pp: float
    unk_token_id: int | None
    unk_rate_reference: float
    unk_rate_current: float
    unk_rate_increase_pp: float


class EmbeddingDrift(BaseModel):
    model: str
    documents: dict[str, int]
    cosine_distance: float
    mmd2: float
    bandwidth: float


class DriftReport(BaseModel):
    schema_version: str = REPORT_SCHEMA
    model: str
    model_kind: str
    registry: dict[str, str] | None
    reference: dict[str, Any]
    current: dict[str, Any]
    perplexity: PerplexityDrift
    token_length: LengthDrift
    tokens: TokenDrift
    embedding: EmbeddingDrift | None
    embedding_skipped: str | None
    checks: list[DriftCheck]
    significance: Significance
    drift_detected: bool
    seconds: float
    created_at: str


@dataclass
class Scored:
    nll: list[float]
    ids: list[list[int]]

    @property
    def lengths(self) -> list[int]:
        return [len(doc) for doc in self.ids]

    @property
    def doc_ppl(self) -> list[float]:
        import math

        return [math.exp(nll / max(len(doc), 1)) for nll, doc in zip(self.nll, self.ids)]


def _score(loaded: Any, texts: list[str], max_length: int, stride: int, batch_size: int | None) -> Scored:
    from lmctl.evaluate.perplexity import perplexity

    nll = perplexity(loaded.model, loaded.tokenizer, texts, max_length, stride, batch_size).doc_nll
    ids = [list(doc) for doc in loaded.tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return Scored(nll=nll, ids=ids)


def _perplexity_drift(cfg: DriftConfig, ref: Scored, cur: Scored, length: int, stride: int) -> PerplexityDrift:
    ref_ppl, cur_ppl, increase, ci95 = stats.bootstrap_ppl_increase(
        ref.nll, ref.lengths, cur.nll, cur.lengths, cfg.bootstrap_samples, cfg.seed)
    return PerplexityDrift(reference=ref_ppl, current=cur_ppl, increase_pct=increase, ci95=ci95,
                           bootstrap_samples=cfg.bootstrap_samples, max_length=length, stride=stride,
                           per_document={"reference": stats.summary(ref.doc_ppl), "current": stats.summary(cur.doc_ppl)})


def _length_drift(cfg: DriftConfig, ref: list[int], cur: list[int]) -> LengthDrift:
    bins = stats.psi_bins_for(len(ref), len(cur), cfg.psi_bins)
    statistic, p_value = stats.ks(ref, cur)
    return LengthDrift(reference=stats.summary(ref), current=stats.summary(cur), psi=stats.psi(ref, cur, bins),
                       psi_bins=bins, ks_statistic=statistic, ks_p_value=p_value)


def _token_drift(cfg: DriftConfig, ref: list[list[int]], cur: list[list[int]], unk_id: int | None) -> TokenDrift:
    expected, current = stats.rare_token_rates(ref, cur, cfg.rare_max_count)
    unk_ref, unk_cur = stats.token_rate(ref, unk_id), stats.token_rate(cur, unk_id)
    return TokenDrift(rare_max_count=cfg.rare_max_count, rare_rate_expected=expected, rare_rate_current=current,
                      rare_rate_increase_pp=100 * (current - expected), unk_token_id=unk_id,
                      unk_rate_reference=unk_ref, unk_rate_current=unk_cur, unk_rate_increase_pp=100 * (unk_cur - unk_ref))


_Tests = dict[str, TestResult]  # by the config key of the check's threshold


def _embedding_drift(cfg: DriftConfig, ref: list[str], cur: list[str]
                     ) -> tuple[EmbeddingDrift | None, str | None, _Tests]:
    """Embedding drift with a local sentence-transformers model and its tests, or (None, why it was skipped, {})."""
    if cfg.embedding_model is None:
        return None, "drift.embedding_model is not set", {}
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return None, "sentence_transformers is not installed", {}
    import numpy as np

    ref, cur = sample(ref, EMBEDDING_MAX_DOCUMENTS, cfg.seed), sample(cur, EMBEDDING_MAX_DOCUMENTS, cfg.seed)
    # a directory path loads from disk only; remote code stays refused
    model = SentenceTransformer(str(cfg.embedding_model), trust_remote_code=False)
    x = model.encode(ref, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    y = model.encode(cur, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    bandwidth, pooled = stats.median_bandwidth(x, y), np.concatenate([x, y]).astype(float)
    tests = {"max_embedding_cosine": _permute(cfg, signals.embedding_cosine(pooled), len(x), len(y)),
             "max_embedding_mmd": _permute(cfg, signals.embedding_mmd2(pooled, bandwidth), len(x), len(y))}
    return EmbeddingDrift(model=str(cfg.embedding_model), documents={"reference": len(ref), "current": len(cur)},
                          cosine_distance=stats.cosine_distance_of_means(x, y), mmd2=stats.mmd2(x, y, bandwidth),
                          bandwidth=bandwidth), None, tests


def _permute(cfg: DriftConfig, statistic: signals.IndexStatistic, n_ref: int, n_cur: int) -> TestResult:
    return signals.permutation(statistic, n_ref, n_cur, cfg.permutations, cfg.seed)


def _signal_tests(cfg: DriftConfig, ref: Scored, cur: Scored, unk_id: int | None, psi_bins: int) -> _Tests:
    """The test of each enabled token-level signal over the pooled documents (reference first)."""
    import numpy as np

    n, m = len(ref.ids), len(cur.ids)
    tokens = np.asarray(ref.lengths + cur.lengths, dtype=float)
    make: dict[str, Any] = {
        "max_ppl_increase": lambda: _permute(cfg, signals.ppl_increase_pct(np.asarray(ref.nll + cur.nll), tokens), n, m),
        "max_psi": lambda: _permute(cfg, signals.length_psi(tokens, psi_bins), n, m),
        "max_ks_statistic": lambda: signals.ks_test(ref.lengths, cur.lengths),
        "max_rare_rate_increase": lambda: _permute(
            cfg, signals.rare_rate_increase_pp(ref.ids + cur.ids, cfg.rare_max_count), n, m),
        "max_unk_rate_increase": lambda: _unk_test(cfg, ref.ids + cur.ids, tokens, unk_id, n),
    }
    return {key: run() for key, run in make.items() if getattr(cfg, key) is not None}


def _unk_test(cfg: DriftConfig, ids: list[list[int]], tokens: Any, unk_id: int | None, n_ref: int) -> TestResult:
    import numpy as np

    if unk_id is None:
        return TestResult(0.0, 1.0, 0.0, "none: the tokenizer has no unknown token")
    hits = np.asarray([list(doc).count(unk_id) for doc in ids], dtype=float)
    return _permute(cfg, signals.rate_increase_pp(hits, tokens), n_ref, len(ids) - n_ref)


def _checks(cfg: DriftConfig, ppl: PerplexityDrift, length: LengthDrift, tokens: TokenDrift,
            emb: EmbeddingDrift | None, tests: _Tests) -> list[DriftCheck]:
    """One check per configured threshold: drift when the effect size exceeds it and the signal is
    significant after the correction across all of them."""
    rare = tests.get("max_rare_rate_increase")
    rows: list[tuple[str, str, float, dict[str, float]]] = [
        ("perplexity increase %", "max_ppl_increase", ppl.increase_pct, {"ci95_low": ppl.ci95[0], "ci95_high": ppl.ci95[1]}),
        ("token length PSI", "max_psi", length.psi, {"bins": length.psi_bins}),
        ("token length KS statistic", "max_ks_statistic", length.ks_statistic, {}),
        ("rare token rate increase pp", "max_rare_rate_increase",
         tokens.rare_rate_increase_pp - (rare.null_mean if rare else 0.0),
         {"expected": tokens.rare_rate_expected, "current": tokens.rare_rate_current,
          "increase_pp": tokens.rare_rate_increase_pp, "same_source_increase_pp": rare.null_mean if rare else 0.0}),
        ("unknown token rate increase pp", "max_unk_rate_increase", tokens.unk_rate_increase_pp, {}),
    ]
    if emb is not None:
        rows += [("embedding cosine distance", "max_embedding_cosine", emb.cosine_distance, {}),
                 ("embedding MMD^2", "max_embedding_mmd", emb.mmd2, {})]
    rows = [row for row in rows if getattr(cfg, row[1]) is not None]
    adjusted = signals.adjust([tests[setting].p_value for _, setting, _, _ in rows], cfg.correction)
    checks = []
    for (name, setting, value, detail), p_adjusted in zip(rows, adjusted):
        threshold, test = getattr(cfg, setting), tests[setting]
        significant = p_adjusted <= cfg.alpha
        checks.append(DriftCheck(name=name, setting=f"drift.{setting}", threshold=threshold, value=round(value, 6),
                                 passed=not (significant and value > threshold), test=test.test,
                                 p_value=test.p_value, p_adjusted=p_adjusted, significant=significant, detail=detail))
    return checks


def _validate(cfg: DriftConfig, max_length: int | None, plot: Path | None) -> None:
    if max_length is not None and max_length < 2:
        raise BadInputError("--max-length must be at least 2")
    if plot is not None and plot.suffix.lower() != ".png":
        raise BadInputError(f"--plot {plot}: the plot is a PNG; name a .png file")
    if cfg.embedding_model is not None and not cfg.embedding_model.is_dir():
        raise BadInputError(f"drift.embedding_model {cfg.embedding_model} is not a directory",
                            hint="give a local sentence-transformers model directory, or unset it")


def detect_drift(model_ref: str, reference: Path, current: Path, cfg: DriftConfig | None = None,
                 text_field: str = "text", max_length: int | None = None, batch_size: int | None = None,
                 report: Path | None = None, plot: Path | None = None) -> DriftReport:
    """Compare `current` inputs with `reference` ones through `model_ref`; write the report and
    plot when asked (after every input was checked). Drift is reported, not raised: see `failed_checks`."""
    from lmctl.loading import load_for_inference
    from lmctl.modelref import resolve

    cfg = cfg or DriftConfig()
    _validate(cfg, max_length, plot)
    started = time.perf_counter()
    ref_in = load_input(reference, text_field, cfg, "reference")
    cur_in = load_input(current, text_field, cfg, "current")
    resolved = resolve(model_ref)
    loaded = load_for_inference(resolved)  # a checkpoint is verified against its lock first (exit 4)
    config = getattr(loaded.model, "config", None)
    length = min(max_length or 1024, int(getattr(config, "max_position_embeddings", 0) or 2048))
    stride = max(1, length // 2)
    ref, cur = (_score(loaded, i.texts, length, stride, batch_size) for i in (ref_in, cur_in))
    unk_id = loaded.tokenizer.unk_token_id
    del loaded
    gc.collect()  # an embedding model may come next
    emb, skipped, emb_tests = _embedding_drift(cfg, ref_in.texts, cur_in.texts)
    found = assess(cfg, ref, cur, unk_id, length, stride, emb, emb_tests)
    result = DriftReport(
        model=model_ref, model_kind=resolved.kind,
        registry={"name": resolved.registry_name, "version": str(resolved.registry_version)}
        if resolved.registry_name else None,
        reference=ref_in.meta, current=cur_in.meta, perplexity=found.perplexity, token_length=found.token_length,
        tokens=found.tokens, embedding=emb, embedding_skipped=skipped, checks=found.checks,
        significance=found.significance, drift_detected=found.drift_detected,
        seconds=round(time.perf_counter() - started, 3), created_at=utc_now(),
    )
    _write_outputs(result, ref, cur, report, plot)
    log.info("%s: perplexity %+.1f%%, length PSI %.3f, KS %.3f", "drift detected" if result.drift_detected
             else "no drift", found.perplexity.increase_pct, found.token_length.psi, found.token_length.ks_statistic)
    return result


@dataclass
class Assessment:
    perplexity: PerplexityDrift
    token_length: LengthDrift
    tokens: TokenDrift
    checks: list[DriftCheck]
    significance: Significance

    @property
    def drift_detected(self) -> bool:
        return any(not c.passed for c in self.checks)


def assess(cfg: DriftConfig, ref: Scored, cur: Scored, unk_id: int | None, max_length: int = 0, stride: int = 0,
           emb: EmbeddingDrift | None = None, emb_tests: _Tests | None = None) -> Assessment:
    """Every signal, its test and the checks, from scored documents (no model needed here:
    `scripts/bench_drift.py` and the tests call it with documents scored once)."""
    ppl = _perplexity_drift(cfg, ref, cur, max_length, stride)
    lengths = _length_drift(cfg, ref.lengths, cur.lengths)
    tokens = _token_drift(cfg, ref.ids, cur.ids, unk_id)
    tests = {**_signal_tests(cfg, ref, cur, unk_id, lengths.psi_bins), **(emb_tests or {})}
    checks = _checks(cfg, ppl, lengths, tokens, emb, tests)
    significance = Significance(alpha=cfg.alpha, correction=cfg.correction, signals=len(checks),
                                permutations=cfg.permutations)
    return Assessment(ppl, lengths, tokens, checks, significance)


def _write_outputs(result: DriftReport, ref: Scored, cur: Scored, report: Path | None, plot: Path | None) -> None:
    png = None
    if plot is not None:  # rendered before anything is written: a plotting failure leaves no report behind
        from lmctl.monitor.plot import render_png

        title = f"{result.model}: {'drift detected' if result.drift_detected else 'no drift'}"
        png = render_png(ref.lengths, cur.lengths, ref.doc_ppl, cur.doc_ppl, title)
    if report is not None:
        write_text_atomic(report, json.dumps(result.model_dump(mode="json"), indent=2) + "\n")
    if png is not None and plot is not None:
        write_bytes_atomic(plot, png)


def failed_checks(result: DriftReport) -> list[DriftCheck]:
    return [c for c in result.checks if not c.passed]
