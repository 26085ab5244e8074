"""`data.streaming: true`: training from an IterableDataset, resumed after SIGKILL at the same example."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import ASSETS


def _losses(run_dir: Path) -> dict[int, float]:
    newest = max((run_dir / "trainer").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    history = json.loads((newest / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def test_streaming_plan_and_max_steps(cli, tiny_config: Path) -> None:
    result = cli("train", tiny_config, "--set", "data.streaming=true", "--set", "train.max_steps=null", "--dry-run")
    assert result.code == 2 and "needs train.max_steps" in result.err
    plan = cli("train", tiny_config, "--set", "data.streaming=true", "--dry-run", "--json")
    assert plan.code == 0, plan.err
    assert plan.json["streaming"] and plan.json["train_rows"] == 0 and plan.json["cache_hit"] is None
    assert plan.json["validation_rows"] == 8 and plan.json["lint"]["eos_labels"] > 0


def test_streaming_resumes_after_sigkill_at_the_same_example(cli, tiny_config: Path, tmp_path: Path) -> None:
    """The stream wraps around the 48-row file several times in 40 steps; a run killed after a
    checkpoint and resumed must log exactly the losses of an uninterrupted run, which it can
    only do if it trains on the same examples in the same order."""
    common = ["--set", "data.streaming=true", "--set", "train.max_steps=40", "--set", "train.save_every=2",
              "--set", "train.eval_every=1000", "--set", "train.log_every=2", "--set", "data.validation=null",
              "--set", f"data.train={ASSETS / 'tiny_train.jsonl'}"]
    straight = cli("train", tiny_config, *common, "--set", "output.run_name=straight", "--json")
    assert straight.code == 0, straight.err

    run_dir = tmp_path / "runs" / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "lmctl", "train", str(tiny_config), *common,
                             "--set", "output.run_name=killed"], stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.monotonic() + 180
    while not (run_dir / "checkpoints" / "step-000004" / "lmctl.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "training ended before its checkpoint"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert max(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*")) < 40

    resumed = cli("train", tiny_config, *common, "--set", "output.run_name=killed", "--json")
    assert resumed.code == 0, resumed.err
    assert resumed.json["steps"] == 40 and resumed.json["resumed_from"] is not None
    expected, actual = _losses(Path(straight.json["run_dir"])), _losses(run_dir)
    assert sorted(actual) == sorted(expected)
    for step, loss in expected.items():
        assert abs(actual[step] - loss) <= 1e-5 * abs(loss), (step, actual[step], loss)
