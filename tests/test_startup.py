"""Start-up: a command on a local model reads a small JSONL without `datasets` and never
imports mlflow (issue 16). Measured with `python -X importtime`, in a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import ASSETS

from lmctl.data import texts


def test_small_jsonl_rows_equal_what_datasets_returns(tmp_path: Path) -> None:
    from datasets import load_dataset

    for name in ("tiny_train.jsonl", "tiny_completion.jsonl", "tiny_validation.jsonl"):
        path = ASSETS / name
        fast = texts.small_jsonl(path)
        assert fast is not None, name
        assert fast == load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path)).to_list()
    # anything irregular goes through datasets, with its checks and messages
    assert texts.small_jsonl(ASSETS / "tiny_chat.jsonl") is None  # lists of turns: arrow unifies their keys
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"text": "a"}\n{"text": 3}\n')
    assert texts.small_jsonl(mixed) is None
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a"}\n{"text": \n')
    assert texts.small_jsonl(broken) is None


def test_eval_on_a_local_model_imports_neither_mlflow_nor_datasets(tiny_base: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "lmctl", "eval", str(tiny_base), "--data",
                          str(ASSETS / "tiny_validation.jsonl"), "--max-length", "32", "--json"],
                         capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert "lmctl.evaluate.perplexity" in imported  # the measurement really ran in this process
    assert not {m for m in imported if m.split(".")[0] in ("mlflow", "datasets")}


def test_cli_import_pulls_neither_eval_run_nor_torch() -> None:
    """Every command imports the CLI app (all flags' defaults and help come from the options
    models); the evaluation machinery, yaml and torch come only with the command that runs."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    probe = ("import sys, lmctl.cli.app\n"
             "print(sorted(m for m in ('lmctl.evaluate.run', 'lmctl.evaluate.suites', 'yaml', 'torch', 'transformers')"
             " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
