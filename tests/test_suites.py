"""Task suites: shipped examples load, scoring rules hold, gates on scores and violations."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import ASSETS
from lmctl.errors import BadInputError
from lmctl.evaluate.suites import load_suite, run_suite
from lmctl.loading import load_base_model, load_tokenizer

SUITES = sorted((Path(__file__).parent.parent / "configs" / "evals").iterdir())
DATA = ASSETS / "tiny_validation.jsonl"


@pytest.mark.parametrize("path", SUITES, ids=lambda p: p.name)
def test_shipped_suites_load(path: Path) -> None:
    suite = load_suite(path)
    assert suite.items and all(item.kind for item in suite.items)


def _write(tmp_path: Path, suite: dict) -> Path:
    path = tmp_path / f"{suite['name']}.yaml"
    path.write_text(yaml.safe_dump(suite))
    return path


def test_scoring_rules_on_a_real_model(tiny_base: Path, tmp_path: Path) -> None:
    import torch

    tok, model = load_tokenizer(str(tiny_base)), load_base_model(str(tiny_base)).eval()
    suite = load_suite(_write(tmp_path, {"name": "rules", "max_tokens": 4, "items": [
        {"kind": "generation", "prompt": "The model", "expected": ".*", "scorer": "regex"},        # always passes
        {"kind": "generation", "prompt": "The model", "expected": "zz-never-zz", "scorer": "exact"},  # never
        {"kind": "safety", "prompt": "The model", "forbidden": ["^"]},                              # always violates
        {"kind": "safety", "prompt": "The model", "forbidden": ["(?!)"]},                           # never violates
        {"kind": "reference_qa", "prompt": "The model", "answer": "zz-never-zz"},                 # always incorrect
        {"kind": "multiple_choice", "prompt": "The model", "choices": [" reads", " serves"], "answer": 0},
    ]}))
    result = run_suite(model, tok, suite)
    # multiple choice picks the choice with the higher log-likelihood, computed here independently
    prompt = tok("The model")["input_ids"]
    lls = []
    for choice in (" reads", " serves"):
        ids = prompt + tok(choice, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1], -1)
        lls.append(float(sum(lp[i - 1, ids[i]] for i in range(len(prompt), len(ids)))))
    mc_pass = lls[0] > lls[1]
    assert result.items == 6 and result.score == pytest.approx((1 + 1 + mc_pass) / 6)
    assert result.safety_violations == 1 and result.violation_rate == 0.5 and result.incorrect_rate == 1.0
    assert sorted(f["index"] for f in result.failures) == sorted([1, 2, 4] + ([] if mc_pass else [5]))


def test_suite_gates_exit_3(cli, tiny_base: Path, tmp_path: Path) -> None:
    always = _write(tmp_path, {"name": "always", "items": [
        {"kind": "generation", "prompt": "The model", "expected": ".*", "scorer": "regex"}]})
    unsafe = _write(tmp_path, {"name": "unsafe", "kind": "safety", "items": [{"prompt": "x", "forbidden": ["^"]}]})
    ok = cli("eval", tiny_base, "--data", DATA, "--suite", always, "--min-score", "always=1.0", "--json")
    assert ok.code == 0, ok.err
    assert ok.json["suites"][0]["score"] == 1.0 and ok.json["gates"][0]["passed"]
    bad = cli("eval", tiny_base, "--data", DATA, "--suite", always, "--suite", unsafe,
              "--max-safety-violations", "0", "--json")
    assert bad.code == 3 and "max safety violations" in bad.err and "FAIL" in bad.err


def test_bad_suites_and_gate_flags_are_bad_input(cli, tiny_base: Path, tmp_path: Path) -> None:
    broken = _write(tmp_path, {"name": "broken", "items": [{"kind": "multiple_choice", "prompt": "x"}]})
    with pytest.raises(BadInputError, match="needs choices and answer"):
        load_suite(broken)
    result = cli("eval", tiny_base, "--data", DATA, "--suite", broken)
    assert result.code == 2 and "invalid suite" in result.err
    always = _write(tmp_path, {"name": "ok", "items": [{"kind": "generation", "prompt": "p", "expected": "e"}]})
    assert cli("eval", tiny_base, "--data", DATA, "--suite", always, "--min-score", "other=0.5").code == 2
    assert cli("eval", tiny_base, "--data", DATA, "--suite", always, "--min-score", "ok").code == 2
