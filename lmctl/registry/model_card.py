"""The model card of a registered version: a `README.md` generated at register time.

It is written from facts lmctl already holds (the checkpoint's lock manifest, the `--eval`
report, the registry's lineage), never typed by hand, so it cannot drift from the model.
The card is logged at the artifact root of the version's MLflow run, beside `checkpoint/`:
the checkpoint's own file set, hashed in lmctl.json, stays exactly what training sealed
(peft already writes a README.md inside it). The card's sha256 is a version tag, and
`lmctl registry verify models:/...` re-hashes it.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from lmctl.checkpoint import Manifest, sha256_file
from lmctl.errors import IntegrityError
from lmctl.evaluate.schema import EvalReport

CARD = "README.md"
# MLflow stores registered-model and version descriptions in 5000-character columns.
DESCRIPTION_LIMIT = 5000
OLD_MODEL_DESCRIPTION = "Managed by lmctl"  # what lmctl wrote before descriptions said what the model is
CARD_TAG = "lmctl.model_card"  # runs:/RUN_ID/README.md
CARD_SHA_TAG = "lmctl.model_card_sha256"
# A whole sha256 in a code span is one unbreakable 64-character word: on the version page it widened
# the training-data table past the page. The page shows its first 12 hex digits (what people compare
# by eye); the card file, its sha256 tag and the `lmctl.*` tags that lmctl and tools read keep all 64.
SHOWN_DIGEST = 12
WHOLE_DIGEST = re.compile(r"`([0-9a-f]{%d})[0-9a-f]{%d}`" % (SHOWN_DIGEST, 64 - SHOWN_DIGEST))


class CardFacts(BaseModel):
    """Everything a card says, gathered by `lmctl register`."""

    name: str
    version: str
    description: str | None
    manifest: Manifest
    manifest_sha256: str
    report: EvalReport | None
    report_path: str | None
    parent_version: str | None  # what held `production` when this version was registered
    run_id: str
    source: str
    added_tokens: dict[str, int]


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    def cell(value: Any) -> str:
        text = f"{value:.6g}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(cell(v) for v in row) + " |" for row in rows)]


def _model(facts: CardFacts) -> list[str]:
    m, lora = facts.manifest, facts.manifest.config.lora
    added = ", ".join(f"`{t}` ({i})" for t, i in facts.added_tokens.items()) or "none"
    return ["## Model", "",
            f"- Base model: `{m.base_model.id}` at revision `{m.base_model.revision or 'as found'}` "
            f"(config sha256 `{m.base_model.config_sha256}`)",
            f"- Adapter: {m.kind}, LoRA r={lora.r}, alpha={lora.alpha}, "
            f"targets `{lora.target_modules}`, DoRA {lora.use_dora}",
            f"- Tokenizer fingerprint `{m.tokenizer.fingerprint}`, {m.tokenizer.vocab_size} tokens; "
            f"special tokens added to the base's: {added}", ""]


def _data(facts: CardFacts) -> list[str]:
    rows = [[split, f"`{fp.path}`", fp.format, fp.rows, f"`{fp.sha256}`"] for split, fp in facts.manifest.data.splits()]
    training = facts.manifest.training

    def loss(value: float | None) -> str:
        return "not measured" if value is None else f"{value:.4f}"

    return ["## Training data", "", *_table(["split", "file", "format", "rows", "sha256 (data fingerprint)"], rows), "",
            f"Trained for {'?' if training.step is None else training.step} steps; last train loss "
            f"{loss(training.train_loss)}, last validation loss {loss(training.eval_loss)}.", ""]


def _metrics(facts: CardFacts) -> list[str]:
    report = facts.report
    if not report:
        return ["## Evaluation", "", "No eval report was attached at registration: quality is unmeasured.", ""]
    lines = ["## Evaluation", "", f"Report `{facts.report_path}` on `{report.data.path}` "
             f"(sha256 `{report.data.sha256}`, {report.data.rows} rows).", "",
             *_table(["metric", "value"], sorted(report.metrics.items())), ""]
    if report.comparison:
        c = report.comparison
        lines += [f"Against `{report.baseline.model if report.baseline else None}`: {c.metric} {c.candidate:.4f} vs "
                  f"{c.baseline:.4f} ({c.regression_pct:+.2f}%).", ""]
    lines += _scores(report)
    if report.gates:
        gates = [[g.name, g.threshold, g.value, "pass" if g.passed else "FAIL"] for g in report.gates]
        lines += _table(["gate", "threshold", "measured", "result"], gates) + [""]
    return lines


def _scores(report: EvalReport) -> list[str]:
    """What the report measured beyond perplexity: suite scores, lm-eval-harness tasks, latency."""
    lines: list[str] = []
    if report.suites:
        suites = [[s.name, s.items, s.score, "" if s.incorrect_rate is None else s.incorrect_rate, s.safety_violations]
                  for s in report.suites]
        lines += _table(["suite", "items", "score", "incorrect rate", "safety violations"], suites) + [""]
    if report.lm_eval:
        scores = [[task, k, v] for task, values in sorted(report.lm_eval.items()) for k, v in sorted(values.items())
                  if isinstance(v, (int, float)) and not isinstance(v, bool)]
        lines += _table(["lm-eval task", "metric", "value"], scores) + [""]
    if report.latency:
        lat = report.latency
        lines += [f"Latency ({lat.runs} requests, {lat.prompt_tokens} prompt + {lat.output_tokens} output tokens): "
                  f"p50 {lat.latency_ms['p50']:.1f} ms, p95 {lat.latency_ms['p95']:.1f} ms; "
                  f"{lat.decode_tokens_per_s:.1f} tokens/s.", ""]
    return lines


def _limitations(facts: CardFacts) -> list[str]:
    m = facts.manifest
    evaluated = "the evaluation data above" if facts.report else "no data at all (no eval report was attached)"
    return ["## Limitations", "",
            f"- Quality was measured on {evaluated}; text unlike the training data is unmeasured.",
            f"- It inherits the limitations and biases of `{m.base_model.id}` and of its training data.",
            "- It is an adapter: it runs only on that base model at that revision, with the tokenizer locked in "
            "`checkpoint/lmctl.json` (lmctl refuses other combinations).", ""]


def _lineage(facts: CardFacts) -> list[str]:
    m = facts.manifest
    parent = f"version {facts.parent_version}" if facts.parent_version else "none"
    libraries = ", ".join(f"{k} {v}" for k, v in sorted(m.libraries.items()))
    return ["## Lineage", "",
            f"- Registry: `models:/{facts.name}/{facts.version}`, registration run `{facts.run_id}`, "
            f"artifacts `{facts.source}`",
            f"- Training run (MLflow): `{m.training.mlflow_run_id or 'unknown'}`",
            f"- Parent (held `production` at registration): {parent}",
            f"- Checkpoint lock: lmctl.json sha256 `{facts.manifest_sha256}`, written {m.created_at} "
            f"by lmctl {m.lmctl_version}",
            f"- Libraries: {libraries}", ""]


def render(facts: CardFacts) -> str:
    """The card as Markdown: intended use, model, data and fingerprint, metrics, limitations, lineage."""
    use = facts.description or (
        f"A LoRA adapter for `{facts.manifest.base_model.id}`, fine-tuned on the data below and meant for "
        "text like it. (`lmctl register --description` states the intended use.)")
    head = [f"# {facts.name} version {facts.version}", "",
            "Generated by `lmctl register` from the checkpoint's lock manifest and eval report; do not edit "
            f"(its sha256 is the registry tag `{CARD_SHA_TAG}`).", "", "## Intended use", "", use, ""]
    return "\n".join(head + _model(facts) + _data(facts) + _metrics(facts) + _limitations(facts) + _lineage(facts))


def model_description(name: str, manifest: Manifest) -> str:
    """The registered model's description (Markdown, shown first on its MLflow UI page): what it is
    and how its versions are used, in words rather than tags."""
    return "\n".join([
        f"**{name}**: LoRA adapters for the causal language model `{manifest.base_model.id}`, fine-tuned, "
        "evaluated and registered by lmctl.", "",
        "Each version is one adapter checkpoint. Its files, tokenizer and base model are locked by sha256 "
        f"(`lmctl registry verify models:/{name}/VERSION` re-checks them), and its page shows its model card: "
        "intended use, training data, evaluation and lineage.", "",
        f"- `@production` is the version that serves: `lmctl serve models:/{name}@production`.",
        "- `lmctl promote` moves it only when an eval report's gates pass; `lmctl rollback` moves it back.",
        f"- Every alias move, with who, when and why: `lmctl registry history {name}`.",
    ])


def version_description(summary: str, card: str, card_uri: str, shown: dict[str, str] | None = None) -> str:
    """The version's description: a one-line summary (the UI's version table shows the first line)
    then the model card's sections, which the version page renders as Markdown as its main view,
    fitted to the page: sha256 digests shortened, and each code span in `shown` (a long storage URI)
    given its short name (its `runs:/` URI). A card longer than MLflow's column keeps its leading
    sections and names the full artifact."""
    tail = (f"\n\n*Model card generated by `lmctl register`; the file is `{card_uri}`, its sha256 the tag "
            f"`{CARD_SHA_TAG}`. Digests are shortened to {SHOWN_DIGEST} characters here; the file holds them whole.*")
    for long, short in (shown or {}).items():
        card = card.replace(f"`{long}`", f"`{short}`")
    # the card's title and provenance line are the page's own header
    sections = WHOLE_DIGEST.sub(r"`\1…`", card).split("\n## ")[1:]
    text = summary.strip().splitlines()[0] if summary.strip() else "LoRA adapter"
    for section in sections:
        if len(text) + len(section) + 4 + len(tail) > DESCRIPTION_LIMIT:
            tail = "\n\n*Shortened to fit the registry:" + tail.removeprefix("\n\n*")
            break
        text += "\n\n## " + section.strip()
    return text[: DESCRIPTION_LIMIT - len(tail)] + tail


def publish(mlflow_client: Any, run_id: str, text: str) -> dict[str, str]:
    """Log the card at the run's artifact root; return the version tags that point at it."""
    mlflow_client.log_text(run_id, text, CARD)
    return {CARD_TAG: f"runs:/{run_id}/{CARD}", CARD_SHA_TAG: hashlib.sha256(text.encode("utf-8")).hexdigest()}


def verify(tags: dict[str, str], tracking_uri: str) -> str | None:
    """Re-hash a version's card against its tag; None for versions registered without one."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    uri, expected = tags.get(CARD_TAG), tags.get(CARD_SHA_TAG)
    if not uri or not expected:
        return None
    with tempfile.TemporaryDirectory(prefix="lmctl-card-") as tmp:
        try:
            path = Path(download_artifacts(artifact_uri=uri, dst_path=tmp, tracking_uri=tracking_uri))
        except (MlflowException, OSError):
            raise IntegrityError(f"model card {uri} is missing from the registry's artifacts") from None
        actual = sha256_file(path)
    if actual != expected:
        raise IntegrityError(f"model card {uri}: sha256 {actual[:16]}… differs from the registry's {expected[:16]}…",
                             hint="the card was changed after registration")
    return uri
