"""Eval reports: versioned JSON, Markdown, self-contained HTML with plots, attached to the registry."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import yaml

from conftest import ASSETS

DATA = ASSETS / "tiny_validation.jsonl"


def test_markdown_and_html_reports(cli, trained_checkpoint: Path, tiny_base: Path, tmp_path: Path) -> None:
    suite = tmp_path / "s.yaml"
    suite.write_text(yaml.safe_dump({"name": "s", "items": [{"kind": "generation", "prompt": "The", "expected": "x"}]}))
    md, page, js = tmp_path / "r.md", tmp_path / "r.html", tmp_path / "r.json"
    result = cli("eval", trained_checkpoint, "--data", DATA, "--max-length", "32", "--baseline", tiny_base,
                 "--suite", suite, "--latency", "--latency-runs", "3", "--output-tokens", "4",
                 "--report", js, "--markdown", md, "--html", page, "--json")
    assert result.code == 0, result.err
    assert json.loads(js.read_text())["schema_version"] == "lmctl.eval/1"
    text = md.read_text()
    assert "## Against" in text and "95% paired bootstrap interval" in text and "| s | 1 |" in text and "## Latency" in text
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page.read_text())
    assert len(images) == 3 and all(base64.b64decode(b)[:4] == b"\x89PNG" for b in images)
    assert "<script" not in page.read_text() and "http" not in page.read_text().replace("https://", "")


def test_html_report_renders_tables_and_escapes_values() -> None:
    """The HTML page shows the Markdown summary's tables as <table>s (not Markdown source in a <pre>),
    and a value from the outside (model reference, suite name) is text, never markup."""
    from lmctl.evaluate import load_eval_report
    from lmctl.evaluate.report import html_page
    from lmctl.evaluate.suites import SuiteResult

    report = load_eval_report(ASSETS / "old_eval_report.json").report
    report = report.model_copy(update={"model": "<script>alert(1)</script>", "suites": [
        SuiteResult(name="<img src=x onerror=alert(2)>", kinds=["generation"], items=4, score=0.75)]})
    page = html_page(report)
    assert "<pre>" not in page and "|---|" not in page
    tables = re.findall(r"<table>.*?</table>", page, re.S)
    assert len(tables) >= 3  # metrics, suites, gates
    assert "<th>metric</th>" in tables[0] and "<td>perplexity</td>" in tables[0]
    assert "<td>&lt;img src=x onerror=alert(2)&gt;</td>" in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script" not in page
    assert "<strong>FAIL</strong>" in page or "<td>pass</td>" in page


def test_log_to_registry_attaches_report_and_tags(cli, trained_checkpoint: Path) -> None:
    from lmctl import tracking, versions

    assert cli("register", trained_checkpoint, "--name", "m", "--alias", "candidate").code == 0
    result = cli("eval", "models:/m@candidate", "--data", DATA, "--max-length", "32", "--log-to-registry", "--json")
    assert result.code == 0, result.err
    version = versions.get_version("m", "1")
    assert float(version.tags["eval.perplexity"]) == float(f"{result.json['perplexity']:.6g}")
    client = tracking.client()
    runs = [a.path for a in client.list_artifacts(version.run_id, "eval")]
    assert len(runs) == 1
    names = sorted(Path(a.path).name for a in client.list_artifacts(version.run_id, runs[0]))
    assert names == ["report.html", "report.json", "report.md"]
    assert cli("eval", trained_checkpoint, "--data", DATA, "--log-to-registry").code == 2


def _chromium() -> str | None:
    import shutil

    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_html_report_renders_in_headless_chromium(cli, trained_checkpoint: Path, tiny_base: Path, tmp_path: Path) -> None:
    import os
    import subprocess

    import pytest
    from PIL import Image

    browser = _chromium()
    if browser is None:
        assert not os.environ.get("CI"), "CI installs chromium (.ci/run); it must be there"
        pytest.skip("no chromium on this machine (make test installs it where apt-get and root are available)")
    suite = tmp_path / "s.yaml"
    suite.write_text(yaml.safe_dump({"name": "s", "items": [{"kind": "generation", "prompt": "The", "expected": ".*",
                                                             "scorer": "regex"}]}))
    page = tmp_path / "r.html"
    result = cli("eval", trained_checkpoint, "--data", DATA, "--max-length", "32", "--baseline", tiny_base,
                 "--suite", suite, "--latency", "--latency-runs", "3", "--output-tokens", "4", "--html", page)
    assert result.code == 0, result.err
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,2400", f"--screenshot={shot}",
                    page.as_uri()], capture_output=True, timeout=120, check=True)
    pixels = Image.open(shot).convert("RGB").getdata()
    colours = {p for p in pixels}
    # the three charts' bar colours (candidate, suite score, latency histogram) were painted, and the
    # tables' header cells (their background is the page's only #dde6f0): tables render as tables
    for rgb in ((0x3B, 0x6E, 0xA5), (0x4F, 0x8F, 0x5B), (0xA5, 0x67, 0x3B), (0xDD, 0xE6, 0xF0)):
        assert rgb in colours, f"colour {rgb} not rendered"
    assert sum(1 for p in pixels if p != (255, 255, 255)) > 0.02 * len(pixels)


def test_report_written_before_the_typed_schema_loads_unchanged() -> None:
    """tests/assets/old_eval_report.json was written by `lmctl eval --baseline ... --report` before
    the report's registry and baseline were typed: it loads, reads back typed, and dumps the same JSON."""
    from lmctl.evaluate import load_eval_report
    from lmctl.evaluate.schema import RegistryRef

    path = ASSETS / "old_eval_report.json"
    loaded = load_eval_report(path)
    report = loaded.report
    assert report.registry == RegistryRef(name="tiny", version="2") and str(report.registry) == "models:/tiny/2"
    assert report.baseline is not None and report.baseline.is_version("tiny", "1", None)
    assert not report.identity.is_version("tiny", "1", report.manifest_sha256 + "x")
    assert report.baseline.perplexity == json.loads(path.read_text())["baseline"]["perplexity"]
    assert json.dumps(report.model_dump(mode="json"), indent=2) + "\n" == path.read_text()
