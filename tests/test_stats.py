"""lmctl.stats: the one percentile (against numpy.quantile), the one bootstrap, and the
callers that report percentiles all agreeing on the same numbers."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from lmctl import stats


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 101, 1000])
def test_percentiles_are_numpy_quantile(n: int) -> None:
    values = np.random.default_rng(n).lognormal(size=n)
    qs = [0.0, 0.01, 0.25, 0.5, 0.9, 0.95, 0.99, 1.0]
    assert stats.percentiles(values.tolist(), qs) == [float(np.quantile(values, q)) for q in qs]
    assert stats.percentile(values, 0.95) == float(np.quantile(values, 0.95))
    with pytest.raises(ValueError):
        stats.percentiles([], [0.5])


def test_every_reported_p95_is_the_same_number() -> None:
    """eval --latency, the serving canary, data validate and drift used four definitions before."""
    from lmctl.data.quality import _token_stats
    from lmctl.evaluate.latency import percentiles
    from lmctl.serve.canary import Window

    values = [12.0, 40.0, 7.0, 33.0, 18.0, 25.0, 90.0, 5.0, 61.0, 14.0, 8.0]
    expected = float(np.quantile(values, 0.95))
    window = Window(span_s=1e9)
    for v in values:
        window.add(True, v / 1000.0, now=0.0)
    from datasets import Dataset

    # data validate reads token lengths from the tokenized Arrow table (n_tokens per row)
    table = Dataset.from_dict({"n_tokens": [int(v) for v in values]})
    token_stats = _token_stats(table, np.zeros(len(values), dtype=bool), 1024)
    assert token_stats is not None
    assert percentiles(values)["p95"] == expected
    assert window.summary()["p95_ms"] == pytest.approx(expected)  # seconds in, ms out
    assert token_stats.p95 == expected
    assert stats.summary(values)["p95"] == expected


def test_paired_bootstrap_interval_matches_a_direct_computation() -> None:
    from lmctl.evaluate.compare import BOOTSTRAP_SAMPLES, compare

    rng = np.random.default_rng(1)
    tokens = rng.integers(20, 200, size=40)
    base_nll = tokens * rng.uniform(2.0, 3.0, size=40)
    cand_nll = base_nll * 0.97
    result = compare(cand_nll.tolist(), tokens.tolist(), base_nll.tolist(), tokens.tolist(), "perplexity", seed=3)
    # the same computation written out: one index matrix, both models scored on the same draws
    idx = np.random.default_rng(3).integers(0, 40, size=(BOOTSTRAP_SAMPLES, 40))
    diffs = (np.exp(cand_nll[idx].sum(1) / tokens[idx].sum(1)) - np.exp(base_nll[idx].sum(1) / tokens[idx].sum(1)))
    assert result.ci95 == pytest.approx(tuple(np.quantile(diffs, [0.025, 0.975])))
    assert result.candidate == pytest.approx(math.exp(cand_nll.sum() / tokens.sum()))
    assert result.ci95[0] < result.difference < result.ci95[1] < 0  # 3% better on every document


def test_bootstrap_chunks_do_not_change_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    nll, units = np.arange(1.0, 51.0), np.full(50, 10.0)

    def run() -> np.ndarray:
        return stats.bootstrap(lambda idx: stats.resampled_ppl(nll, units, idx), 50, 300, np.random.default_rng(0))

    whole = run()
    monkeypatch.setattr(stats, "BOOTSTRAP_CELLS", 50 * 7)  # 7 resamples per chunk
    assert np.array_equal(run(), whole) and whole.shape == (300,)


def test_canary_and_reload_events_are_bounded() -> None:
    from lmctl.serve.canary import EVENTS_KEPT, Router
    from lmctl.serve.reload import AliasFollower
    from lmctl.serve.settings import CanaryPolicy, ServeSettings

    # Router bookkeeping only: slots stand in for loaded versions (role, names, version)
    primary = SimpleNamespace(role="primary", model_name="m", ref="a", version="1", describe=lambda: {})
    router = Router(primary, None, 0.5, CanaryPolicy(min_requests=1, max_error_rate_margin=0.0))  # type: ignore[arg-type]
    for i in range(EVENTS_KEPT + 50):
        canary = SimpleNamespace(role="canary", model_name="m", ref="b", version=str(i), describe=lambda: {})
        router.swap("canary", canary)  # type: ignore[arg-type]
        router.record(canary, ok=False, latency_s=0.01)  # type: ignore[arg-type]
    assert len(router.events) == EVENTS_KEPT and router.events[-1]["canary_version"] == str(EVENTS_KEPT + 49)
    assert len(router.state()["events"]) == 10

    follower = AliasFollower(router, ServeSettings(), {}, metrics=None)
    for i in range(EVENTS_KEPT * 3):
        follower._event("reload_refused", "primary", "m", str(i), "failed verification")
    assert len(follower.events) == EVENTS_KEPT and follower.events[-1]["version"] == str(EVENTS_KEPT * 3 - 1)
