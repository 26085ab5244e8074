"""Baseline comparison and gates: paired bootstrap interval, exit 3 with a table on failure."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import ASSETS
from lmctl.evaluate.compare import compare

DATA = ASSETS / "tiny_validation.jsonl"


def test_bootstrap_interval_is_paired_and_contains_the_difference() -> None:
    cand = [10.0, 20.0, 30.0, 40.0]
    units = [5, 10, 15, 20]
    same = compare(cand, units, cand, units, "perplexity")
    assert same.difference == 0 and same.ci95 == (0.0, 0.0)  # paired: identical models never differ
    worse = compare([x * 1.1 for x in cand], units, cand, units, "perplexity")
    assert worse.ci95[0] <= worse.difference <= worse.ci95[1] and worse.ci95[0] > 0
    assert abs(worse.regression_pct - 100 * (worse.candidate / worse.baseline - 1)) < 1e-9


def test_gate_passes_and_fails_with_exit_3(cli, trained_checkpoint: Path, tiny_base: Path, tmp_path: Path) -> None:
    ok = cli("eval", trained_checkpoint, "--data", DATA, "--max-length", "32", "--baseline", tiny_base,
             "--max-ppl-regression", "0", "--json")
    assert ok.code == 0, ok.err
    cmp = ok.json["comparison"]
    assert cmp["metric"] == "perplexity" and cmp["difference"] < 0  # the adapter helps on this data
    assert cmp["ci95"][0] <= cmp["difference"] <= cmp["ci95"][1]
    assert ok.json["gates"] == [{"name": "max perplexity regression %", "threshold": 0.0,
                                 "value": round(cmp["regression_pct"], 4), "passed": True}]
    report = tmp_path / "report.json"
    # the base model against the tuned adapter: a regression, and a 0% budget
    failed = cli("eval", tiny_base, "--data", DATA, "--max-length", "32", "--baseline", trained_checkpoint,
                 "--max-ppl-regression", "0", "--report", report, "--json")
    assert failed.code == 3
    assert "FAIL" in failed.err and "max perplexity regression %" in failed.err and "Traceback" not in failed.err
    assert json.loads(failed.out)["gates"][0]["passed"] is False  # the report still reaches stdout and the file
    assert json.loads(report.read_text())["comparison"]["regression_pct"] > 0


def test_gate_without_baseline_is_bad_input(cli, tiny_base: Path) -> None:
    result = cli("eval", tiny_base, "--data", DATA, "--max-ppl-regression", "5")
    assert result.code == 2 and "needs --baseline" in result.err
