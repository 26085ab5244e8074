"""`lmctl eval --latency`: percentiles are ordered and consistent; the p95 gate exits 3."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import ASSETS
from lmctl.evaluate.latency import percentiles

DATA = ASSETS / "tiny_validation.jsonl"


def test_percentiles() -> None:
    stats = percentiles([float(v) for v in range(1, 101)])  # linear interpolation, as numpy.quantile
    assert (stats["p50"], stats["p95"], stats["p99"], stats["mean"]) == (50.5, pytest.approx(95.05), pytest.approx(99.01), 50.5)


def test_latency_report_and_gate(cli, tiny_base: Path) -> None:
    result = cli("eval", tiny_base, "--data", DATA, "--latency", "--prompt-tokens", "16", "--output-tokens", "8",
                 "--latency-runs", "5", "--max-p95-latency", "60000", "--json")
    assert result.code == 0, result.err
    lat = result.json["latency"]
    assert lat["runs"] == 5 and lat["output_tokens"] == 8
    assert 0 < lat["ttft_ms"]["p50"] <= lat["latency_ms"]["p50"] <= lat["latency_ms"]["p95"] <= lat["latency_ms"]["p99"]
    assert lat["decode_tokens_per_s"] > 0 and lat["input_tokens"]["max"] >= lat["input_tokens"]["p50"] > 0
    assert result.json["gates"][0]["name"] == "max p95 latency ms" and result.json["gates"][0]["passed"]
    slow = cli("eval", tiny_base, "--data", DATA, "--latency", "--latency-runs", "2", "--max-p95-latency", "0.001")
    assert slow.code == 3 and "max p95 latency ms" in slow.err
    assert cli("eval", tiny_base, "--data", DATA, "--max-p95-latency", "5").code == 2
