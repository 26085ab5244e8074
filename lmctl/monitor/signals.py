"""The drift signals as statistical tests: one p-value per signal, and the correction across them.

Why permutations of whole documents: tokens within a document are not independent (a document
repeats its own names and rare words), so a test that treats tokens as independent draws (a
chi-square or G-test over the token table) rejects far more often than its alpha on two halves of
one corpus. Swapping whole documents between the two sets is exact under "both sets are draws
of one document distribution", whatever the statistic (`scipy.stats.permutation_test`, one-sided:
drift is an increase). The permutations also measure a statistic's small-sample bias: the
Good-Turing rare-token gap runs 2-3 points above 0 on same-source halves of 50 documents, so its
effect size is the observed gap minus its mean over the permutations. The KS signal uses
`scipy.stats.ks_2samp`'s own p-value.

Holm's step-down correction (and Bonferroni) is written here because scipy ships only
Benjamini-Hochberg (`false_discovery_control`), which bounds the false discovery rate, not the
chance of any false alarm that a nightly retrain acts on; Holm is a few lines.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from lmctl import stats

Correction = Literal["holm", "bonferroni", "none"]
PERMUTATION_BATCH = 100  # permutations evaluated at once: memory is about batch x vocabulary floats


@dataclass(frozen=True)
class TestResult:
    statistic: float  # the observed value of the signal
    p_value: float  # one-sided: the chance of a value at least this large without drift
    null_mean: float  # the statistic's mean over the permutations (0 where the test has none)
    test: str  # what produced the p-value


IndexStatistic = Callable[[np.ndarray, np.ndarray], np.ndarray]


def permutation(statistic: IndexStatistic, n_ref: int, n_cur: int, resamples: int, seed: int,
                test: str = "permutation over documents") -> TestResult:
    """One-sided permutation test of `statistic(ref_idx, cur_idx)`, which maps index matrices
    (one permutation per row, indices into the pooled documents, reference first) to one value per row."""
    from scipy.stats import permutation_test

    if min(n_ref, n_cur) < 2:  # scipy needs two per set; one document cannot show significant drift
        observed = float(statistic(np.arange(n_ref)[None], np.arange(n_ref, n_ref + n_cur)[None])[0])
        return TestResult(observed, 1.0, observed, "none: fewer than 2 documents in a set")

    def vectorized(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
        x, y = np.moveaxis(x, axis, -1), np.moveaxis(y, axis, -1)
        out = statistic(np.atleast_2d(x).astype(np.int64), np.atleast_2d(y).astype(np.int64))
        return out if x.ndim > 1 else out[0]  # the observed value is a scalar

    data = (np.arange(n_ref), np.arange(n_ref, n_ref + n_cur))
    result = permutation_test(data, vectorized, permutation_type="independent", vectorized=True,
                              n_resamples=resamples, alternative="greater", batch=PERMUTATION_BATCH,
                              rng=np.random.default_rng(seed))
    return TestResult(float(result.statistic), float(result.pvalue), float(np.mean(result.null_distribution)), test)


def _sums(values: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return values[idx].sum(-1)


def ppl_increase_pct(nll: np.ndarray, tokens: np.ndarray) -> IndexStatistic:
    """100 x (ppl_cur / ppl_ref - 1), token-weighted, from per-document NLL sums and token counts."""
    def statistic(ref: np.ndarray, cur: np.ndarray) -> np.ndarray:
        ref_nll = _sums(nll, ref) / np.maximum(_sums(tokens, ref), 1)
        cur_nll = _sums(nll, cur) / np.maximum(_sums(tokens, cur), 1)
        return 100 * np.expm1(cur_nll - ref_nll)
    return statistic


def length_psi(lengths: np.ndarray, bins: int) -> IndexStatistic:
    def statistic(ref: np.ndarray, cur: np.ndarray) -> np.ndarray:
        return stats.psi_rows(lengths[ref], lengths[cur], bins)
    return statistic


def rate_increase_pp(hits: np.ndarray, tokens: np.ndarray) -> IndexStatistic:
    """100 x (share of current tokens that hit - share of reference tokens that hit)."""
    def statistic(ref: np.ndarray, cur: np.ndarray) -> np.ndarray:
        ref_rate = _sums(hits, ref) / np.maximum(_sums(tokens, ref), 1)
        return 100 * (_sums(hits, cur) / np.maximum(_sums(tokens, cur), 1) - ref_rate)
    return statistic


def rare_rate_increase_pp(ids: Sequence[Sequence[int]], max_count: int) -> IndexStatistic:
    """`stats.rare_token_rates`' current minus expected rate, in points, for any split of the
    pooled documents `ids`: per-split token counts come from one sparse document x token matrix."""
    from scipy.sparse import csr_matrix

    docs = [np.asarray(doc, dtype=np.int64) for doc in ids]
    pooled = np.concatenate(docs or [np.zeros(0, np.int64)])
    vocab, column = np.unique(pooled, return_inverse=True)
    rows = np.repeat(np.arange(len(docs)), [len(d) for d in docs])
    counts = csr_matrix((np.ones(len(pooled)), (rows, column)), shape=(len(docs), len(vocab)))
    counts.sum_duplicates()
    total = np.asarray(counts.sum(0)).ravel()

    def statistic(ref: np.ndarray, cur: np.ndarray) -> np.ndarray:
        members = np.zeros((len(ref), len(docs)))
        np.put_along_axis(members, ref, 1.0, axis=1)
        ref_counts = np.asarray((counts.T @ members.T).T)  # permutations x vocabulary
        cur_counts = total[None, :] - ref_counts
        expected = (ref_counts * (ref_counts <= max_count + 1)).sum(1) / np.maximum(ref_counts.sum(1), 1)
        current = (cur_counts * (ref_counts <= max_count)).sum(1) / np.maximum(cur_counts.sum(1), 1)
        return 100 * (current - expected)
    return statistic


def embedding_cosine(x: np.ndarray) -> IndexStatistic:
    def statistic(ref: np.ndarray, cur: np.ndarray) -> np.ndarray:
        mr, mc = x[ref].mean(1), x[cur].mean(1)
        denom = np.maximum(np.linalg.norm(mr, axis=1) * np.linalg.norm(mc, axis=1), 1e-12)
        return 1 - (mr * mc).sum(1) / denom
    return statistic


def embedding_mmd2(x: np.ndarray, bandwidth: float) -> IndexStatistic:
    """`stats.mmd2` for any split, from the pooled kernel matrix (its diagonal is 1)."""
    sq = (x * x).sum(1)
    kernel = np.exp(-np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0) / (2 * bandwidth ** 2))

    def statistic(ref: np.ndarray, cur: np.ndarray) -> np.ndarray:
        n, m = ref.shape[1], cur.shape[1]
        rm, cm = np.zeros((len(ref), len(x))), np.zeros((len(cur), len(x)))
        np.put_along_axis(rm, ref, 1.0, axis=1)
        np.put_along_axis(cm, cur, 1.0, axis=1)
        rk, ck = rm @ kernel, cm @ kernel
        within_r = ((rk * rm).sum(1) - n) / (n * (n - 1))
        within_c = ((ck * cm).sum(1) - m) / (m * (m - 1))
        return within_r + within_c - 2 * (rk * cm).sum(1) / (n * m)
    return statistic


def ks_test(reference: Sequence[float], current: Sequence[float]) -> TestResult:
    """Two-sided two-sample KS (drift in either direction of the lengths counts)."""
    statistic, p_value = stats.ks(reference, current)
    return TestResult(statistic, p_value, 0.0, "two-sample Kolmogorov-Smirnov (scipy.stats.ks_2samp)")


def adjust(p_values: Sequence[float], method: Correction) -> list[float]:
    """Family-wise adjusted p-values: reject signal i at level alpha when adjusted[i] <= alpha.

    Holm: sort ascending, adjusted_(j) = max over k <= j of min(1, (m - k + 1) p_(k)).
    Bonferroni: min(1, m p). "none": as given.
    """
    p = np.asarray(p_values, dtype=float)
    m = len(p)
    if method == "none" or m == 0:
        return [float(v) for v in p]
    if method == "bonferroni":
        return [float(v) for v in np.minimum(1.0, m * p)]
    order = np.argsort(p, kind="stable")
    stepped = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * p[order]))
    adjusted = np.empty(m)
    adjusted[order] = stepped
    return [float(v) for v in adjusted]
