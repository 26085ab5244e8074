"""The statistics lmctl reports, each defined once: percentiles, the bootstrap over documents,
and the two-sample measures of the drift checks (PSI, KS, MMD, cosine distance of means,
the Good-Turing rare-token baseline).

Plain numpy (and scipy's KS test, which mlflow already requires), so each function can be
checked against numpy itself or against values computed by hand (tests/test_stats.py,
tests/test_drift.py). One percentile definition means `eval --latency`'s p95, the serving
canary's p95 and `data validate`'s token-length p95 agree on the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from numpy.typing import ArrayLike

PSI_EPSILON = 1e-4  # share given to an empty bin, so ln(cur/ref) stays finite
BOOTSTRAP_CELLS = 2_000_000  # resampled indices held in memory at once (samples x documents)


def percentiles(values: ArrayLike, qs: Sequence[float]) -> list[float]:
    """The `qs` quantiles (0-1) of `values`, linearly interpolated between order statistics
    (numpy.quantile's default; Hyndman-Fan type 7, as R and pandas). ValueError when empty."""
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        raise ValueError("percentiles of an empty sample")
    return [float(v) for v in np.quantile(arr, list(qs))]


def percentile(values: ArrayLike, q: float) -> float:
    return percentiles(values, [q])[0]


def ci95(values: ArrayLike) -> tuple[float, float]:
    """The central 95% of bootstrap replicates: the percentile interval."""
    low, high = percentiles(values, (0.025, 0.975))
    return low, high


def bootstrap(statistic: Callable[[np.ndarray], np.ndarray], n: int, samples: int,
              rng: np.random.Generator) -> np.ndarray:
    """`statistic` over `samples` resamples (with replacement) of n documents.

    `statistic` maps a matrix of resampled indices (one resample per row) to one value per
    row; evaluating two statistics inside one call pairs them (same documents drawn for
    both), separate calls leave them unpaired. Resamples are drawn in chunks of at most
    BOOTSTRAP_CELLS indices, so memory stays bounded on large sample logs.
    """
    chunk = max(1, BOOTSTRAP_CELLS // max(n, 1))
    out = []
    for start in range(0, samples, chunk):
        out.append(statistic(rng.integers(0, n, size=(min(chunk, samples - start), n))))
    return np.concatenate(out)


def resampled_ppl(nll: np.ndarray, units: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Perplexity of each resample (row of `idx`) from per-document NLL sums and units (tokens or bytes)."""
    return np.exp(nll[idx].sum(1) / np.maximum(units[idx].sum(1), 1))


def psi_bins_for(n_reference: int, n_current: int, max_bins: int) -> int:
    """Bins for PSI: at most `max_bins`, and about 10 documents per bin in the smaller set.

    PSI is biased upwards on small samples (roughly (bins - 1) x (1/n_ref + 1/n_cur) for two
    samples of one distribution), so a 40-document log gets 4 bins rather than 10.
    """
    return max(2, min(max_bins, min(n_reference, n_current) // 10))


def psi(reference: ArrayLike, current: ArrayLike, bins: int) -> float:
    """Population stability index of `current` against `reference`.

    Bin edges are the reference's quantiles (equal-mass bins; repeated edges of integer data
    leave bins empty in both sets, which add 0), a value on an edge goes to the upper bin, and
    an empty bin counts as PSI_EPSILON. PSI = sum over bins of (cur - ref) x ln(cur / ref).
    """
    return float(psi_rows(np.asarray(reference, dtype=float)[None], np.asarray(current, dtype=float)[None], bins)[0])


def psi_rows(reference: np.ndarray, current: np.ndarray, bins: int) -> np.ndarray:
    """`psi` of each row of `reference` (k x n) against the same row of `current` (k x m)."""
    edges = np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1], axis=1).T[:, None, :]  # k x 1 x (bins-1)

    def shares(values: np.ndarray) -> np.ndarray:
        index = (values[:, :, None] >= edges).sum(2)  # the upper bin on an edge (searchsorted side="right")
        counts = (index[:, :, None] == np.arange(bins)).sum(1)
        return np.maximum(counts / values.shape[1], PSI_EPSILON)

    ref_share, cur_share = shares(reference), shares(current)
    return np.sum((cur_share - ref_share) * np.log(cur_share / ref_share), axis=1)


def ks(reference: ArrayLike, current: ArrayLike) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov test: (statistic = largest gap between the ECDFs, p-value)."""
    from scipy.stats import ks_2samp

    result = ks_2samp(np.asarray(reference, dtype=float), np.asarray(current, dtype=float))
    return float(result.statistic), float(result.pvalue)


def median_bandwidth(x: np.ndarray, y: np.ndarray) -> float:
    """The median heuristic: the median distance between distinct points of the pooled sample."""
    pooled = np.concatenate([x, y])
    dist = np.sqrt(np.maximum(_sq_dists(pooled, pooled), 0))
    off_diagonal = dist[~np.eye(len(pooled), dtype=bool)]
    median = float(np.median(off_diagonal)) if off_diagonal.size else 0.0
    return median if median > 0 else 1.0


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T


def mmd2(x: ArrayLike, y: ArrayLike, bandwidth: float | None = None) -> float:
    """Unbiased squared maximum mean discrepancy with an RBF kernel exp(-|a-b|^2 / (2 s^2)).

    s defaults to the median heuristic. Being unbiased, the estimate is about 0 for two samples
    of one distribution and can be slightly negative; it grows as the distributions separate.
    """
    a, b = np.atleast_2d(np.asarray(x, dtype=float)), np.atleast_2d(np.asarray(y, dtype=float))
    if len(a) < 2 or len(b) < 2:
        raise ValueError("MMD needs at least two points in each sample")
    s = bandwidth if bandwidth is not None else median_bandwidth(a, b)

    def kernel(p: np.ndarray, q: np.ndarray) -> np.ndarray:
        return np.exp(-np.maximum(_sq_dists(p, q), 0) / (2 * s * s))

    kxx, kyy, kxy = kernel(a, a), kernel(b, b), kernel(a, b)
    n, m = len(a), len(b)
    within_x = (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
    within_y = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within_x + within_y - 2 * kxy.mean())


def cosine_distance_of_means(x: ArrayLike, y: ArrayLike) -> float:
    """1 - cosine similarity of the two samples' mean vectors (0 = same direction)."""
    mx, my = np.asarray(x, dtype=float).mean(0), np.asarray(y, dtype=float).mean(0)
    denom = float(np.linalg.norm(mx) * np.linalg.norm(my))
    return 1.0 - float(mx @ my) / denom if denom > 0 else 1.0


def bootstrap_ppl_increase(ref_nll: Sequence[float], ref_tokens: Sequence[int], cur_nll: Sequence[float],
                           cur_tokens: Sequence[int], samples: int = 1000, seed: int = 0
                           ) -> tuple[float, float, float, tuple[float, float]]:
    """(reference ppl, current ppl, increase %, 95% interval of the increase %).

    The two sets hold different documents, so each is resampled on its own (an unpaired
    bootstrap), and the increase 100 x (ppl_cur / ppl_ref - 1) is recomputed from the
    resampled per-document NLL sums each time.
    """
    rn, rt = np.asarray(ref_nll, dtype=float), np.asarray(ref_tokens, dtype=float)
    cn, ct = np.asarray(cur_nll, dtype=float), np.asarray(cur_tokens, dtype=float)
    ref_ppl, cur_ppl = math.exp(rn.sum() / rt.sum()), math.exp(cn.sum() / ct.sum())
    rng = np.random.default_rng(seed)
    cur_boot = bootstrap(lambda idx: resampled_ppl(cn, ct, idx), len(cn), samples, rng)
    ref_boot = bootstrap(lambda idx: resampled_ppl(rn, rt, idx), len(rn), samples, rng)
    return ref_ppl, cur_ppl, 100 * (cur_ppl / ref_ppl - 1), ci95(100 * (cur_boot / ref_boot - 1))


def rare_token_rates(ref_ids: Sequence[Sequence[int]], cur_ids: Sequence[Sequence[int]], max_count: int
                     ) -> tuple[float, float]:
    """(expected rate, current rate) of tokens that occur at most `max_count` times in the reference.

    Current rate: the share of current tokens whose id has a reference count <= max_count
    (max_count 0: unseen in the reference). Expected rate for a fresh sample of the reference
    distribution, by Good-Turing: the mass of ids seen r times is about (r + 1) N_{r+1} / N, so
    the mass of ids seen at most max_count times is the share of reference tokens whose id
    occurs at most max_count + 1 times.
    """
    ref = np.concatenate([np.asarray(ids, dtype=np.int64) for ids in ref_ids] or [np.zeros(0, np.int64)])
    cur = np.concatenate([np.asarray(ids, dtype=np.int64) for ids in cur_ids] or [np.zeros(0, np.int64)])
    size = int(max(ref.max(initial=0), cur.max(initial=0))) + 1
    counts = np.bincount(ref, minlength=size)
    expected = float(np.mean(counts[ref] <= max_count + 1)) if ref.size else 0.0
    current = float(np.mean(counts[cur] <= max_count)) if cur.size else 0.0
    return expected, current


def token_rate(ids: Sequence[Sequence[int]], token_id: int | None) -> float:
    """Share of all tokens equal to `token_id` (0 when the tokenizer has no such token)."""
    total = sum(len(doc) for doc in ids)
    if token_id is None or total == 0:
        return 0.0
    return sum(list(doc).count(token_id) for doc in ids) / total


def summary(values: Sequence[float]) -> dict[str, float]:
    """mean, p50, p95 and max of a list of numbers (token lengths, per-document perplexity)."""
    arr = np.asarray(values, dtype=float)
    p50, p95 = percentiles(arr, (0.5, 0.95))
    return {"mean": float(arr.mean()), "p50": p50, "p95": p95, "max": float(arr.max())}
