"""One full lifecycle on a tiny model: train -> eval -> register -> promote -> serve (real HTTP)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx

from conftest import free_port
from http_wait import wait_for_http


def test_full_lifecycle(cli, tiny_config: Path, tmp_path: Path, lmctl_home: Path) -> None:
    trained = cli("train", tiny_config, "--json")
    assert trained.code == 0, trained.err
    result = trained.json
    ckpt = Path(result["checkpoint"])
    assert result["steps"] == 6 and result["tokens"] > 0 and result["eval_loss"] is not None
    assert [Path(p).name for p in result["checkpoints"]] == ["step-000003", "step-000006"]
    manifest = json.loads((ckpt / "lmctl.json").read_text())
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(manifest["files"])
    assert manifest["tokenizer"]["special_tokens"]["eos"] is not None and manifest["tokenizer"]["probe_ids"]
    assert manifest["data"]["train"]["rows"] == 48 and manifest["training"]["step"] == 6
    assert not list(ckpt.parent.glob(".tmp-*")), "staging directories must not survive"

    data = Path(__file__).parent / "assets" / "tiny_validation.jsonl"
    base_eval = cli("eval", manifest["base_model"]["id"],
                    "--data", data, "--max-length", "32", "--json")
    assert base_eval.code == 0, base_eval.err
    report = tmp_path / "report.json"
    tuned_eval = cli("eval", ckpt, "--data", data, "--max-length", "32", "--report", report, "--json")
    assert tuned_eval.code == 0, tuned_eval.err
    # A random-init tiny model learns the repetitive corpus fast: the adapter must help.
    assert tuned_eval.json["perplexity"] < base_eval.json["perplexity"]
    assert json.loads(report.read_text())["perplexity"] == tuned_eval.json["perplexity"]

    reg = cli("register", ckpt, "--name", "tiny", "--alias", "candidate", "--eval", report, "--json")
    assert reg.code == 0, reg.err
    assert reg.json["version"] == "1" and reg.json["metrics"]["perplexity"] == tuned_eval.json["perplexity"]
    shown = cli("registry", "show", "tiny@candidate", "--json").json
    assert shown["tags"]["lmctl.tokenizer_fingerprint"] == manifest["tokenizer"]["fingerprint"]
    assert shown["tags"]["lmctl.data_fingerprint"] == manifest["data"]["train"]["sha256"]
    assert "eval.perplexity" in shown["tags"]

    assert shown["model_card"] == reg.json["model_card"] and shown["status"] == "READY" and shown["usable"] is True

    # the first promotion needs no report: nothing holds production yet to compare against
    promoted = cli("promote", "tiny", "1", "--alias", "production", "--json")
    assert promoted.code == 0 and promoted.json["previous_version"] is None
    assert promoted.json["gated"] is False and promoted.json["why"] == "first promotion"
    listed = cli("registry", "list", "--json").json["versions"]
    assert len(listed) == 1 and set(listed[0]["aliases"]) == {"candidate", "production"}

    via_registry = cli("eval", "models:/tiny@production", "--data", data, "--max-length", "32", "--json")
    assert via_registry.code == 0, via_registry.err
    assert abs(via_registry.json["perplexity"] - tuned_eval.json["perplexity"]) < 1e-6

    port = free_port()
    log = tmp_path / "serve.log"
    server = subprocess.Popen([sys.executable, "-m", "lmctl", "serve", "models:/tiny@production", "--port", str(port)],
                              stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_http(f"{url}/healthz", timeout=120, proc=server, log=log)
        body = {"prompt": "The model", "max_tokens": 5, "temperature": 0}
        response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["object"] == "text_completion" and isinstance(answer["choices"][0]["text"], str)
        assert answer["usage"]["completion_tokens"] <= 5 and answer["usage"]["prompt_tokens"] > 0
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 0}, timeout=10).status_code == 422
    finally:
        server.terminate()
        server.wait(timeout=30)
