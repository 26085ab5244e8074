"""The same config under torchrun: 2 CPU processes (gloo), one run, one set of checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from lmctl import checkpoint


def test_torchrun_two_processes_write_one_valid_checkpoint(tiny_config: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "lmctl", "train", str(tiny_config), "--set", "train.max_steps=4", "--set", "train.save_every=4",
           "--set", "train.batch_size=2", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    objects = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(objects) == 1, proc.stdout  # only rank 0 prints the result
    result = objects[0]
    steps = sorted(p.name for p in (tmp_path / "runs" / "tiny" / "checkpoints").iterdir())
    assert steps == ["step-000004"] and result["steps"] == 4
    checkpoint.verify(Path(result["checkpoint"]))
    assert not list((tmp_path / "runs" / "tiny" / "checkpoints").glob(".tmp-*"))
