"""Faults and world sizes under torchrun (CPU, gloo); slow: each starts several training processes.

- a rank SIGKILLed mid-run under `--max-restarts 1`: torchrun restarts every worker, they
  resume from the newest sealed checkpoint and finish with the losses of a run never killed;
- a checkpoint trained by 4 processes loads in one, and `lmctl eval` and plain transformers +
  peft score it identically.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import assert_same_losses
from dist_support import CHILD_ENV, eval_at_world_size_1, json_objects, kill_when_sealed, lmctl
from lmctl import checkpoint

pytestmark = pytest.mark.slow


def test_a_killed_rank_is_restarted_and_the_run_ends_as_if_never_killed(tiny_config: Path, tmp_path: Path) -> None:
    common = ["--nproc-per-node", "2", "--set", "train.batch_size=2", "--set", "train.max_steps=40",
              "--set", "train.save_every=4", "--set", "train.eval_every=1000", "--set", "train.log_every=2",
              "--set", "data.validation=null", "--json"]
    straight = lmctl("train", str(tiny_config), *common, "--set", "output.run_name=straight")
    assert straight.returncode == 0, straight.stderr[-3000:]

    run_dir = tmp_path / "runs" / "killed"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "lmctl", "train", str(tiny_config), *common, "--set", "output.run_name=killed",
         "--max-restarts", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **CHILD_ENV},
        start_new_session=True)
    try:
        kill_when_sealed(launcher, 1, run_dir / "checkpoints" / "step-000004")
        out, err = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:  # a hung job must not outlive the test
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode == 0, err[-3000:]
    assert "exitcode: -9" in err, err[-3000:]  # torchrun saw the SIGKILL and restarted the workers
    (result,) = json_objects(out)
    assert result["steps"] == 40 and result["resumed_from"] is not None, result
    resumed_at = int(result["resumed_from"].rsplit("-", 1)[1])
    assert 4 <= resumed_at < 40  # from a sealed checkpoint of the killed attempt, not from scratch
    assert_same_losses(tmp_path / "runs" / "straight", run_dir)
    assert abs(result["train_loss"] - json_objects(straight.stdout)[0]["train_loss"]) <= 1e-5
    checkpoint.verify(Path(result["checkpoint"]))


def test_a_checkpoint_trained_by_4_processes_loads_in_one(cli, tiny_config: Path, tiny_base: Path) -> None:
    """4 processes x batch 1 (global batch 4) make the adapter one process makes at batch 4; it
    loads at world size 1, and `lmctl eval` and plain transformers + peft score it identically."""
    short = ["--set", "train.max_steps=4", "--set", "train.save_every=4", "--set", "train.eval_every=4", "--json"]
    proc = lmctl("train", str(tiny_config), "--nproc-per-node", "4", "--set", "train.batch_size=1", *short)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = json_objects(proc.stdout)
    assert result["world_size"] == 4
    one = cli("train", tiny_config, "--set", "output.run_name=one", *short)
    assert one.code == 0, one.err
    four = eval_at_world_size_1(cli, Path(result["checkpoint"]), tiny_base)
    assert four["nll_sum"] == pytest.approx(eval_at_world_size_1(cli, Path(one.json["checkpoint"]), tiny_base)["nll_sum"],
                                            rel=1e-5)
