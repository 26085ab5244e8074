"""`lmctl drift`: are the current (production) inputs still like the reference data?

Each check is reported with its value, its threshold (the `drift` config section; null turns a
check off) and pass/fail; `drift_detected` is true when any check fails.

- Perplexity: token-weighted perplexity of the model on each set (strided windows, as in
  docs/evaluation.md "How perplexity is computed"); increase % = 100 x (ppl_current / ppl_reference - 1)
  with a 95% interval from an unpaired bootstrap over documents (the sets hold different
  documents, so each is resampled on its own). Drift when the increase exceeds
  `max_ppl_increase` AND the interval lies above 0, so a small noisy sample alone cannot trip it.
- Token length (tokens per document, the model's tokenizer, no special tokens): PSI over
  bins at the reference's quantiles (`stats.psi`), and the two-sample KS test; the KS check
  fails only when the statistic exceeds `max_ks_statistic` and its p-value is below `ks_p_value`.
- Rare tokens: token ids that occur at most `rare_max_count` times in the reference
  (0 = unseen in the reference). The current rate (share of current tokens that are rare) is
  compared with what a fresh sample of the reference distribution would show, estimated by
  Good-Turing from the reference itself (`stats.rare_token_rates`); the value is the
  difference in percentage points.
- Unknown tokens: share of tokens that are the tokenizer's unk id (byte-level BPE tokenizers
  have none or never emit it, so this is 0 there); current minus reference, in points.
- Embeddings (optional): only when `sentence_transformers` is importable and
  `drift.embedding_model` names a local model directory (nothing is downloaded). Cosine
  distance of the mean normalized embeddings, and unbiased MMD^2 (RBF kernel, median
  bandwidth) on at most 1000 seeded-sampled documents per set. Otherwise `embedding` is null
  and `embedding_skipped` says why.

Inputs: any text-shaped data file (`lmctl.data.load_texts`), or the request sample log that
`lmctl serve` writes (JSONL rows with `prompt` and `request_id`, schema lmctl.sample/1): a
completion row contributes its prompt, a chat row its messages' contents joined by newlines
(not the templated prompt, whose special tokens would skew the token checks).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from lmctl import data, stats
from lmctl.atomic import write_bytes_atomic, write_text_atomic
from lmctl.clock import utc_now
from lmctl.config import DriftConfig
from lmctl.errors import BadInputError, DataError
from lmctl.evaluate.compare import Gate

log = logging.getLogger("lmctl.drift")
REPORT_SCHEMA = "lmctl.drift/1"
EMBEDDING_MAX_DOCUMENTS = 1000  # MMD holds n x n kernel matrices


class DriftCheck(Gate):
    setting: str  # the config key of the threshold, e.g. drift.max_psi
    detail: dict[str, float] = {}


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
    drift_detected: bool
    seconds: float
    created_at: str


@dataclass
class _Input:
    texts: list[str]
    meta: dict[str, Any]


@dataclass
class _Scored:
    nll: list[float]
    ids: list[list[int]]

    @property
    def lengths(self) -> list[int]:
        return [len(doc) for doc in self.ids]

    @property
    def doc_ppl(self) -> list[float]:
        import math

        return [math.exp(nll / max(len(doc), 1)) for nll, doc in zip(self.nll, self.ids)]


def _first_row(path: Path) -> dict[str, Any] | None:
    if path.suffix.lower() not in (".jsonl", ".json"):
        return None
    with path.open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.strip():
                with contextlib.suppress(json.JSONDecodeError):
                    row = json.loads(line)
                    return row if isinstance(row, dict) else None
                return None
    return None


def is_sample_log(path: Path) -> bool:
    """True for serve's request sample log: JSON lines with `prompt` and `request_id`."""
    row = _first_row(path)
    return row is not None and "prompt" in row and "request_id" in row


def _sample_text(row: dict[str, Any]) -> str:
    messages = row.get("messages")
    if isinstance(messages, list) and messages:
        return "\n".join(str(m.get("content") or "") for m in messages if isinstance(m, dict))
    prompt = row.get("prompt")
    return prompt if isinstance(prompt, str) else ""


def read_sample_log(path: Path) -> list[str]:
    """The non-empty prompt texts of a sample log, in file order."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason})") from None
    texts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # serve appends whole lines; a crash can cut only the last one
                log.warning("%s: skipping a truncated last line", path)
                continue
            raise DataError(f"{path}: line {number}: not valid JSON") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {number}: expected a JSON object")
        text = _sample_text(row)
        if text.strip():
            texts.append(text)
    if not texts:
        raise DataError(f"{path}: no prompt text in the sample log")
    return texts


def _sample(texts: list[str], limit: int | None, seed: int) -> list[str]:
    """A seeded random subset in file order (all of them when within the limit)."""
    if limit is None or len(texts) <= limit:
        return texts
    keep = sorted(random.Random(seed).sample(range(len(texts)), limit))
    return [texts[i] for i in keep]


def _is_blank(path: Path) -> bool:
    """True when the file holds only whitespace (read in blocks: sample logs can be large)."""
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 16), b""):
            if block.strip():
                return False
    return True


def load_input(path: Path, text_field: str, cfg: DriftConfig, role: str) -> _Input:
    """Read a reference or current file (a data file or a sample log), checked and subsampled."""
    if not path.is_file():
        raise DataError(f"{role} file not found: {path}")
    if _is_blank(path):
        raise DataError(f"{role} file {path} is empty")
    if is_sample_log(path):
        texts, fmt, field = read_sample_log(path), "serve_sample", "prompt"
    else:
        texts, fmt, field = data.load_texts(path, text_field), "text", data.field_for(path, text_field)
    if len(texts) < cfg.min_documents:
        raise DataError(f"{role} file {path} has {len(texts)} document(s); drift needs at least {cfg.min_documents}",
                        hint="collect more, or lower --min-documents")
    scored = _sample(texts, cfg.max_documents, cfg.seed)
    meta = data.fingerprint(path, field, len(texts), fmt).model_dump()
    return _Input(texts=scored, meta={**meta, "documents": len(scored)})


def _score(loaded: Any, texts: list[str], max_length: int, stride: int, batch_size: int | None) -> _Scored:
    from lmctl.evaluate.perplexity import perplexity

    nll = perplexity(loaded.model, loaded.tokenizer, texts, max_length, stride, batch_size).doc_nll
    ids = [list(doc) for doc in loaded.tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return _Scored(nll=nll, ids=ids)


def _perplexity_drift(cfg: DriftConfig, ref: _Scored, cur: _Scored, length: int, stride: int) -> PerplexityDrift:
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


def _embedding_drift(cfg: DriftConfig, ref: list[str], cur: list[str]) -> tuple[EmbeddingDrift | None, str | None]:
    """Embedding drift with a local sentence-transformers model, or (None, why it was skipped)."""
    if cfg.embedding_model is None:
        return None, "drift.embedding_model is not set"
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return None, "sentence_transformers is not installed"
    ref, cur = _sample(ref, EMBEDDING_MAX_DOCUMENTS, cfg.seed), _sample(cur, EMBEDDING_MAX_DOCUMENTS, cfg.seed)
    # a directory path loads from disk only; remote code stays refused
    model = SentenceTransformer(str(cfg.embedding_model), trust_remote_code=False)
    x = model.encode(ref, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    y = model.encode(cur, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    bandwidth = stats.median_bandwidth(x, y)
    return EmbeddingDrift(model=str(cfg.embedding_model), documents={"reference": len(ref), "current": len(cur)},
                          cosine_distance=stats.cosine_distance_of_means(x, y), mmd2=stats.mmd2(x, y, bandwidth),
                          bandwidth=bandwidth), None


def _checks(cfg: DriftConfig, ppl: PerplexityDrift, length: LengthDrift, tokens: TokenDrift,
            emb: EmbeddingDrift | None) -> list[DriftCheck]:
    """One check per configured threshold; `drifted` is when the value says drift."""
    rows: list[tuple[str, str, float, float | None, bool | None, dict[str, float]]] = [
        ("perplexity increase %", "max_ppl_increase", ppl.increase_pct, cfg.max_ppl_increase,
         ppl.ci95[0] > 0, {"ci95_low": ppl.ci95[0], "ci95_high": ppl.ci95[1]}),
        ("token length PSI", "max_psi", length.psi, cfg.max_psi, None, {"bins": length.psi_bins}),
        ("token length KS statistic", "max_ks_statistic", length.ks_statistic, cfg.max_ks_statistic,
         length.ks_p_value < cfg.ks_p_value, {"p_value": length.ks_p_value, "alpha": cfg.ks_p_value}),
        ("rare token rate increase pp", "max_rare_rate_increase", tokens.rare_rate_increase_pp,
         cfg.max_rare_rate_increase, None, {"expected": tokens.rare_rate_expected, "current": tokens.rare_rate_current}),
        ("unknown token rate increase pp", "max_unk_rate_increase", tokens.unk_rate_increase_pp,
         cfg.max_unk_rate_increase, None, {}),
    ]
    if emb is not None:
        rows += [("embedding cosine distance", "max_embedding_cosine", emb.cosine_distance, cfg.max_embedding_cosine, None, {}),
                 ("embedding MMD^2", "max_embedding_mmd", emb.mmd2, cfg.max_embedding_mmd, None, {})]
    checks = []
    for name, setting, value, threshold, significant, detail in rows:
        if threshold is None:
            continue
        drifted = value > threshold and significant is not False
        checks.append(DriftCheck(name=name, setting=f"drift.{setting}", threshold=threshold, value=round(value, 6),
                                 passed=not drifted, detail=detail))
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
    ppl = _perplexity_drift(cfg, ref, cur, length, stride)
    lengths = _length_drift(cfg, ref.lengths, cur.lengths)
    tokens = _token_drift(cfg, ref.ids, cur.ids, unk_id)
    emb, skipped = _embedding_drift(cfg, ref_in.texts, cur_in.texts)
    checks = _checks(cfg, ppl, lengths, tokens, emb)
    result = DriftReport(
        model=model_ref, model_kind=resolved.kind,
        registry={"name": resolved.registry_name, "version": str(resolved.registry_version)}
        if resolved.registry_name else None,
        reference=ref_in.meta, current=cur_in.meta, perplexity=ppl, token_length=lengths, tokens=tokens,
        embedding=emb, embedding_skipped=skipped, checks=checks, drift_detected=any(not c.passed for c in checks),
        seconds=round(time.perf_counter() - started, 3), created_at=utc_now(),
    )
    _write_outputs(result, ref, cur, report, plot)
    log.info("%s: perplexity %+.1f%%, length PSI %.3f, KS %.3f", "drift detected" if result.drift_detected
             else "no drift", ppl.increase_pct, lengths.psi, lengths.ks_statistic)
    return result


def _write_outputs(result: DriftReport, ref: _Scored, cur: _Scored, report: Path | None, plot: Path | None) -> None:
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
