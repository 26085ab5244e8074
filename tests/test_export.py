"""`lmctl export --merge`: a plain HF model equal to the adapter, tokenizer files intact."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from conftest import ASSETS


def test_merge_export_is_equivalent_and_keeps_the_tokenizer(cli, trained_checkpoint: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    result = cli("export", trained_checkpoint, "--merge", "--out", out, "--json")
    assert result.code == 0, result.err
    assert result.json["max_logit_diff"] <= 1e-3
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (trained_checkpoint / name).read_bytes()
    assert not (out / "adapter_config.json").exists() and (out / "model.safetensors").is_file()
    manifest = json.loads((out / "lmctl-export.json").read_text())
    assert manifest["files"]["model.safetensors"]["sha256"]
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.eos_token == "</s>" and tok.chat_template
    # a plain transformers load of the export scores like lmctl's adapter path
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    data = ASSETS / "tiny_validation.jsonl"
    adapter = cli("eval", trained_checkpoint, "--data", data, "--max-length", "32", "--json").json["perplexity"]
    merged = cli("eval", out, "--data", data, "--max-length", "32", "--json").json["perplexity"]
    assert abs(merged / adapter - 1) < 1e-4
    ids = torch.tensor([tok("The model reads")["input_ids"]])
    assert model(input_ids=ids).logits.shape[-1] >= len(tok)


def test_export_refuses_overwrite_and_non_checkpoints(cli, trained_checkpoint: Path, tiny_base: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep").write_text("x")
    assert cli("export", trained_checkpoint, "--out", out).code == 2 and (out / "keep").exists()
    assert cli("export", tiny_base, "--out", tmp_path / "p").code == 2
    copied = cli("export", trained_checkpoint, "--out", tmp_path / "copy", "--json")
    assert copied.code == 0 and (tmp_path / "copy" / "lmctl.json").is_file()
