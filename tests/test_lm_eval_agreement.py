"""lmctl's `rolling` perplexity against lm-eval-harness itself, on a tiny local model and task.

Both sides score the same documents with loglikelihood_rolling semantics; documents are
longer than the 64-token window so the rolling windows really roll.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ASSETS

TASK_YAML = """\
task: lmctl_local_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


def test_rolling_matches_lm_eval_harness(tiny_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from lmctl.evaluate import EvalOptions, evaluate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rows = [json.loads(line)["text"] for line in (ASSETS / "tiny_train.jsonl").read_text().splitlines()]
    docs = [" ".join(rows[i : i + 6]) for i in range(0, 36, 6)]  # 6 documents of ~150-250 tokens
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    (task_dir / "lmctl_local_ppl.yaml").write_text(TASK_YAML.format(data=data))

    out = simple_evaluate(
        model="hf", model_args=f"pretrained={tiny_base},dtype=float32,max_length=64", tasks=["lmctl_local_ppl"],
        task_manager=TaskManager(include_path=str(task_dir)), batch_size=1, device="cpu",
    )
    theirs = out["results"]["lmctl_local_ppl"]
    ours = evaluate(str(tiny_base), data, EvalOptions(method="rolling", max_length=64)).metrics
    assert ours["word_perplexity"] == pytest.approx(theirs["word_perplexity,none"], rel=1e-3)
    assert ours["byte_perplexity"] == pytest.approx(theirs["byte_perplexity,none"], rel=1e-3)
    assert ours["bits_per_byte"] == pytest.approx(theirs["bits_per_byte,none"], rel=1e-3)
    print(f"lmctl {ours}\nlm-eval {theirs}")


def test_lm_eval_bridge_on_an_adapter_checkpoint(cli, trained_checkpoint: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = ASSETS / "tiny_validation.jsonl"
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    (task_dir / "lmctl_local_ppl.yaml").write_text(TASK_YAML.format(data=data))
    result = cli("eval", trained_checkpoint, "--data", data, "--method", "rolling", "--max-length", "256",
                 "--lm-eval", "lmctl_local_ppl", "--lm-eval-include", task_dir, "--json")
    assert result.code == 0, result.err
    theirs = result.json["lm_eval"]["lmctl_local_ppl"]
    # lm-eval loaded base + adapter itself (peft=); it must score what lmctl scores
    assert theirs["word_perplexity"] == pytest.approx(result.json["metrics"]["word_perplexity"], rel=1e-3)
    bad = cli("eval", trained_checkpoint, "--data", data, "--lm-eval", "no_such_task", "--lm-eval-include", task_dir)
    assert bad.code == 2 and "unknown lm-eval task" in bad.err
