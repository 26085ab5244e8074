"""The model card generated at register: content from the manifest, the eval report and lineage;
its hash is a tag that `registry verify` checks."""

from __future__ import annotations

import json
import os
from pathlib import Path

from conftest import ASSETS


def _card_file(run_id: str) -> Path:
    [card] = (Path(os.environ["LMCTL_HOME"]) / "mlartifacts").glob(f"{run_id}/artifacts/README.md")
    return card


def test_model_card_is_generated_verified_and_tamper_evident(cli, trained_checkpoint: Path, tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    suite = tmp_path / "s.yaml"
    suite.write_text('name: greetings\nitems:\n  - {kind: generation, prompt: "The", expected: ".*", scorer: regex}\n')
    assert cli("eval", trained_checkpoint, "--data", ASSETS / "tiny_validation.jsonl", "--max-length", "32",
               "--suite", suite, "--report", report).code == 0
    first = cli("register", trained_checkpoint, "--name", "card", "--json")
    assert first.code == 0 and first.json["parent_version"] is None
    assert cli("promote", "card", "1").code == 0
    reg = cli("register", trained_checkpoint, "--name", "card", "--eval", report,
              "--description", "Answers questions about the tiny corpus.", "--json")
    assert reg.code == 0, reg.err
    assert reg.json["parent_version"] == "1" and reg.json["model_card"] == f"runs:/{reg.json['run_id']}/README.md"

    shown = cli("registry", "show", "card/2", "--json").json
    assert shown["model_card"] == reg.json["model_card"] and len(shown["tags"]["lmctl.model_card_sha256"]) == 64
    text = _card_file(reg.json["run_id"]).read_text()
    manifest = json.loads((trained_checkpoint / "lmctl.json").read_text())
    perplexity = json.loads(report.read_text())["metrics"]["perplexity"]
    for expected in ("## Intended use", "Answers questions about the tiny corpus.", "## Limitations", "## Lineage",
                     manifest["data"]["train"]["sha256"], manifest["training"]["mlflow_run_id"],
                     manifest["base_model"]["id"], f"| perplexity | {perplexity:.6g} |", "held `production`",
                     "version 1", "models:/card/2",
                     # the report's suite scores, as its metrics and gates are (issue 26)
                     "| suite | items | score | incorrect rate | safety violations |", "| greetings | 1 | 1 |",
                     f"Report `{report.resolve()}`", f"| train | `{manifest['data']['train']['path']}` |"):
        assert expected in text, expected
    assert Path(manifest["data"]["train"]["path"]).is_absolute()
    assert "quality is unmeasured" in _card_file(first.json["run_id"]).read_text()

    from lmctl import tracking

    client = tracking.client()  # what the MLflow UI shows first: descriptions, in words
    assert "LoRA adapters for the causal language model" in client.get_registered_model("card").description
    described = client.get_model_version("card", "2").description
    assert described.startswith("Answers questions about the tiny corpus. (LoRA adapter on ")
    assert "\n## Intended use" in described and f"| perplexity | {perplexity:.6g} |" in described

    verified = cli("registry", "verify", "models:/card/2", "--json")
    assert verified.code == 0, verified.err
    assert verified.json["model_card"] == reg.json["model_card"]
    _card_file(reg.json["run_id"]).write_text(text.replace("tiny corpus", "everything"))
    tampered = cli("registry", "verify", "models:/card/2")
    assert tampered.code == 4 and "model card" in tampered.err and "sha256" in tampered.err


def test_version_description_fits_mlflow_and_keeps_whole_sections() -> None:
    from lmctl.registry.model_card import DESCRIPTION_LIMIT, version_description

    card = "# m version 1\n\nGenerated...\n\n## Intended use\n\nShort.\n\n## Training data\n\n" + "x" * 6000
    text = version_description("Short. (LoRA adapter on b, step 2)", card, "runs:/r/README.md")
    assert len(text) <= DESCRIPTION_LIMIT and "## Intended use" in text and "## Training data" not in text
    assert "Shortened" in text and "runs:/r/README.md" in text and not text.startswith("#")
    whole = version_description("S", card[:200], "runs:/r/README.md")
    assert "## Training data" in whole and "Shortened" not in whole


def test_version_description_shows_short_digests_and_the_card_keeps_them_whole() -> None:
    from lmctl.registry.model_card import version_description

    digest = "397bd643f90437afec55c43d7977b28fc" + "0" * 31
    card = f"# m version 1\n\nGenerated...\n\n## Training data\n\n| split | sha256 |\n|---|---|\n| train | `{digest}` |\n"
    text = version_description("S", card, "runs:/r/README.md")
    assert f"| train | `{digest[:12]}…` |" in text and digest not in text
    assert "shortened to 12 characters" in text and digest in card
    storage = "file:///srv/mlflow/mlartifacts/0123456789abcdef0123456789abcdef/artifacts/checkpoint"
    lineage = version_description("S", card + f"\n## Lineage\n\n- artifacts `{storage}`\n", "runs:/r/README.md",
                                  shown={storage: "runs:/r/checkpoint"})
    assert "- artifacts `runs:/r/checkpoint`" in lineage and storage not in lineage
