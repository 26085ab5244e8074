"""`lmctl drift`: the statistics against hand-computed values, then the command end to end on a
tiny model trained for real steps (same-distribution sets pass, a drifted set exits 3)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from conftest import ASSETS
from lmctl.config import DriftConfig, load_config
from lmctl.errors import DataError
from lmctl import stats
from lmctl.monitor.inputs import load_input, read_sample_log

REFERENCE = ASSETS / "tiny_train.jsonl"  # the data the checkpoint was trained on
SAME = ASSETS / "drift_current_same.jsonl"  # new documents from the same generator
SHIFTED = ASSETS / "drift_current_shifted.jsonl"  # German words, ids and numbers, ~10x longer
SAMPLE_LOG = ASSETS / "drift_serve_sample.jsonl"  # serve's sample log; same distribution as REFERENCE
FAST = ("--max-length", "64", "--batch-size", "64")


# --- statistics, by hand ---------------------------------------------------------------

def test_psi_matches_hand_computation() -> None:
    ref = [1, 2, 3, 4]  # two bins split at the median 2.5: shares 0.5 / 0.5
    assert stats.psi(ref, [1, 3, 4, 4], bins=2) == pytest.approx(0.25 * math.log(2) + 0.25 * math.log(1.5))
    empty_low_bin = (1e-4 - 0.5) * math.log(1e-4 / 0.5) + 0.5 * math.log(2)
    assert stats.psi(ref, [3, 4, 4, 4], bins=2) == pytest.approx(empty_low_bin)
    assert stats.psi(ref, ref, bins=2) == 0.0
    assert stats.psi_bins_for(1000, 40, 10) == 4 and stats.psi_bins_for(5, 5, 10) == 2
    assert stats.psi_bins_for(1000, 5000, 10) == 10


def test_ks_matches_hand_computation() -> None:
    statistic, p_value = stats.ks([1, 2, 3, 4], [3, 4, 5, 6])  # ECDF gap 0.5 at x=2 (and x=4)
    assert statistic == pytest.approx(0.5) and 0 < p_value < 1
    assert stats.ks([1, 2, 3], [1, 2, 3]) == (0.0, 1.0)


def test_mmd_and_cosine_match_hand_computation() -> None:
    x, y = [[0.0], [1.0]], [[2.0], [3.0]]
    k = lambda d2: math.exp(-d2 / 2)  # noqa: E731 - RBF with bandwidth 1
    expected = k(1) + k(1) - 2 * (k(4) + k(9) + k(1) + k(4)) / 4
    assert stats.mmd2(x, y, bandwidth=1.0) == pytest.approx(expected)
    assert stats.mmd2(x, x, bandwidth=1.0) == pytest.approx(k(1) + k(1) - 2 * (1 + k(1)) / 2)  # unbiased: below 0
    # pooled distances 1,1,1,2,2,3 (each twice): the median is 1.5
    assert stats.median_bandwidth(stats.np.array(x), stats.np.array(y)) == pytest.approx(1.5)
    assert stats.cosine_distance_of_means([[1, 0], [1, 0]], [[0, 1]]) == pytest.approx(1.0)
    assert stats.cosine_distance_of_means([[1, 0]], [[2, 0]]) == pytest.approx(0.0)


def test_rare_and_unknown_token_rates_match_hand_computation() -> None:
    ref = [[1, 1, 2, 3], [3, 3]]  # counts: 1 -> 2, 2 -> 1, 3 -> 3
    cur = [[4, 1, 2, 5]]
    # unseen only: Good-Turing expects the singleton share of the reference (token 2: 1/6)
    assert stats.rare_token_rates(ref, cur, max_count=0) == pytest.approx((1 / 6, 2 / 4))
    # seen at most once: expectation = share of reference tokens seen at most twice (1,1,2: 3/6)
    assert stats.rare_token_rates(ref, cur, max_count=1) == pytest.approx((3 / 6, 3 / 4))
    assert stats.token_rate([[0, 1], [0, 0, 2]], 0) == pytest.approx(3 / 5)
    assert stats.token_rate([[0, 1]], None) == 0.0


def test_unpaired_bootstrap_interval() -> None:
    nll, tokens = [10.0, 20.0, 30.0, 40.0, 25.0], [5, 10, 15, 20, 12]
    ref_ppl, cur_ppl, increase, (low, high) = stats.bootstrap_ppl_increase(nll, tokens, nll, tokens, 500)
    assert ref_ppl == cur_ppl and increase == 0.0 and low < 0 < high  # unpaired: resampling noise on both sides
    _, _, worse, (low, high) = stats.bootstrap_ppl_increase(nll, tokens, [x * 1.2 for x in nll], tokens, 500)
    assert worse == pytest.approx(100 * (math.exp(1.2 * 125 / 62) / math.exp(125 / 62) - 1))
    assert 0 < low <= worse <= high


# --- inputs ---------------------------------------------------------------------------------

def test_sample_log_uses_prompts_and_chat_message_contents(tmp_path: Path) -> None:
    texts = read_sample_log(SAMPLE_LOG)
    rows = [json.loads(line) for line in SAMPLE_LOG.read_text().splitlines()]
    assert len(texts) == len(rows) == 60
    assert texts[2] == rows[2]["messages"][0]["content"] and rows[2]["endpoint"] == "chat.completions"
    assert texts[0] == rows[0]["prompt"] and not any("<s>" in t for t in texts)  # never the templated prompt
    assert any("[REDACTED_EMAIL]" in t for t in texts)
    cut = tmp_path / "cut.jsonl"  # serve crashed mid-append: the cut last line is skipped
    cut.write_text(SAMPLE_LOG.read_text() + '{"request_id": "x", "prompt": "The mod')
    assert read_sample_log(cut) == texts


def test_max_documents_samples_and_min_documents_refuses() -> None:
    cfg = DriftConfig(max_documents=10)
    sampled = load_input(REFERENCE, "text", cfg, "reference")
    assert len(sampled.texts) == 10 and sampled.meta["rows"] == 48 and sampled.meta["documents"] == 10
    with pytest.raises(DataError, match="has 48 document"):
        load_input(REFERENCE, "text", DriftConfig(min_documents=100), "reference")


# --- the command ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One adapter trained for real steps on REFERENCE, shared by this module's command tests."""
    from lmctl.cli import main

    root = tmp_path_factory.mktemp("drift-train")
    cfg = {"model": {"base": str(tiny_base)}, "data": {"train": str(REFERENCE), "max_length": 64},
           "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
           "train": {"max_steps": 12, "batch_size": 8, "lr": 1e-2, "eval_every": 100, "save_every": 100},
           "output": {"dir": str(root / "runs"), "run_name": "drift"}}
    (root / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setenv("LMCTL_HOME", str(root / "home"))
        assert main(["train", str(root / "c.yaml"), "--json"]) == 0
    yield Path(json.loads(out.getvalue())["checkpoint"])


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_same_distribution_is_not_drift(cli, checkpoint: Path, tmp_path: Path) -> None:
    report, plot = tmp_path / "out" / "drift.json", tmp_path / "out" / "drift.png"
    result = cli("drift", "--model", checkpoint, "--reference", REFERENCE, "--current", SAME, *FAST,
                 "--report", report, "--plot", plot, "--json")
    assert result.code == 0, result.err
    body = result.json
    assert body["schema_version"] == "lmctl.drift/1" and body["drift_detected"] is False
    assert {c["name"] for c in body["checks"]} >= {"perplexity increase %", "token length PSI",
                                                    "token length KS statistic", "rare token rate increase pp"}
    assert all(c["passed"] for c in body["checks"])
    ppl = body["perplexity"]
    assert ppl["ci95"][0] <= ppl["increase_pct"] <= ppl["ci95"][1]
    assert ppl["reference"] < 380  # the adapter learned some of the reference (the untrained model sits near 400)
    assert body["embedding"] is None and body["embedding_skipped"]
    assert json.loads(report.read_text()) == body
    import matplotlib.image

    assert _png_size(plot) == (1000, 380) and plot.stat().st_size > 10_000
    assert matplotlib.image.imread(str(plot))[..., :3].std() > 0.05  # drawn, not a blank canvas


def test_drifted_set_trips_drift_with_exit_3(cli, checkpoint: Path, tmp_path: Path) -> None:
    report = tmp_path / "drift.json"
    result = cli("drift", "--model", checkpoint, "--reference", REFERENCE, "--current", SHIFTED, *FAST,
                 "--report", report, "--json")
    assert result.code == 3, result.err
    failed = {c["name"] for c in result.json["checks"] if not c["passed"]}
    assert failed >= {"perplexity increase %", "token length PSI", "token length KS statistic",
                      "rare token rate increase pp"}
    assert result.json["drift_detected"] is True and result.json["perplexity"]["ci95"][0] > 10
    assert result.json["token_length"]["current"]["mean"] > 5 * result.json["token_length"]["reference"]["mean"]
    assert "FAIL" in result.err and "lmctl: error: drift detected: perplexity increase %" in result.err
    assert "Traceback" not in result.err
    assert json.loads(report.read_text())["drift_detected"] is True  # the report is still written


def test_serve_sample_log_as_current(cli, tiny_base: Path, tmp_path: Path) -> None:
    from importlib.util import find_spec

    args = ["drift", "--model", tiny_base, "--reference", REFERENCE, "--current", SAMPLE_LOG, *FAST, "--json"]
    if find_spec("sentence_transformers") is None:  # the embedding path reports why it was skipped
        (tmp_path / "st-model").mkdir()
        args += ["--embedding-model", tmp_path / "st-model"]
    result = cli(*args)
    assert result.code == 0, result.err
    body = result.json
    assert body["current"]["format"] == "serve_sample" and body["current"]["documents"] == 60
    assert body["current"]["text_field"] == "prompt" and body["drift_detected"] is False
    if find_spec("sentence_transformers") is None:
        assert body["embedding"] is None and body["embedding_skipped"] == "sentence_transformers is not installed"


def test_thresholds_from_config_then_flags(cli, tiny_base: Path, tmp_path: Path) -> None:
    config = tmp_path / "drift.yaml"
    config.write_text("drift:\n  max_psi: 0.1\n  max_ks_statistic: null\n  max_rare_rate_increase: null\n")
    result = cli("drift", "--model", tiny_base, "--reference", REFERENCE, "--current", SHIFTED, *FAST,
                 "--config", config, "--set", "drift.max_unk_rate_increase=2", "--max-psi", "100", "--json")
    assert result.code == 0, result.err  # the untrained model's perplexity barely moves; the rest is off or loose
    checks = {c["name"]: c for c in result.json["checks"]}
    assert set(checks) == {"perplexity increase %", "token length PSI", "unknown token rate increase pp"}
    assert checks["token length PSI"]["threshold"] == 100 and checks["token length PSI"]["value"] > 1
    assert checks["unknown token rate increase pp"]["threshold"] == 2
    assert load_config(config).drift.max_psi == 0.1


def test_bad_input_exits_2_and_writes_nothing(cli, tiny_base: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    report, plot = tmp_path / "r.json", tmp_path / "p.png"
    cases = [
        (("--current", tmp_path / "missing.jsonl"), "current file not found"),
        (("--current", empty), "is empty"),
        (("--current", SAME, "--min-documents", "41"), "has 40 document(s); drift needs at least 41"),
        (("--current", SAME, "--embedding-model", tmp_path / "nope"), "is not a directory"),
        (("--current", SAME, "--set", "drift.max_psi=-1"), "drift.max_psi"),
    ]
    for extra, message in cases:
        result = cli("drift", "--model", tiny_base, "--reference", REFERENCE, *extra, "--report", report, "--plot", plot)
        assert result.code == 2, (extra, result.err)
        assert message in result.err and "Traceback" not in result.err
    bad_plot = cli("drift", "--model", tiny_base, "--reference", REFERENCE, "--current", SAME, "--plot", tmp_path / "p.jpg")
    assert bad_plot.code == 2 and ".png" in bad_plot.err
    assert not report.exists() and not plot.exists() and {p.name for p in tmp_path.iterdir()} <= {"empty.jsonl", "home"}


def test_tampered_checkpoint_is_integrity_failure(cli, checkpoint: Path, tmp_path: Path) -> None:
    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoint, copy)
    (copy / "adapter_config.json").write_text((copy / "adapter_config.json").read_text() + " ")
    result = cli("drift", "--model", copy, "--reference", REFERENCE, "--current", SAME, "--report", tmp_path / "r.json")
    assert result.code == 4 and "adapter_config.json" in result.err
    assert not (tmp_path / "r.json").exists()
