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


def test_log_to_registry_attaches_report_and_tags(cli, trained_checkpoint: Path) -> None:
    from lmctl import registry

    assert cli("register", trained_checkpoint, "--name", "m", "--alias", "candidate").code == 0
    result = cli("eval", "models:/m@candidate", "--data", DATA, "--max-length", "32", "--log-to-registry", "--json")
    assert result.code == 0, result.err
    version = registry.get_version("m", "1")
    assert float(version.tags["eval.perplexity"]) == float(f"{result.json['perplexity']:.6g}")
    client = registry.client()
    runs = [a.path for a in client.list_artifacts(version.run_id, "eval")]
    assert len(runs) == 1
    names = sorted(Path(a.path).name for a in client.list_artifacts(version.run_id, runs[0]))
    assert names == ["report.html", "report.json", "report.md"]
    assert cli("eval", trained_checkpoint, "--data", DATA, "--log-to-registry").code == 2
