"""Concurrent `lmctl register` processes on one fresh embedded registry."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


# Three processes already race on creating the fresh sqlite store, the model and version
# numbers; eight (each paying ~10 s of imports on a small CI machine) run with -m slow.
@pytest.mark.parametrize("processes", [3, pytest.param(8, marks=pytest.mark.slow)])
def test_concurrent_registers_make_one_version_each(cli, trained_checkpoint: Path, processes: int) -> None:
    procs = [subprocess.Popen([sys.executable, "-m", "lmctl", "register", str(trained_checkpoint), "--name", "c", "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(processes)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = [p.returncode for p in procs]
    assert codes == [0] * processes, [err[-500:] for _, err in outs]
    versions = cli("registry", "list", "c", "--json").json["versions"]
    assert sorted(int(v["version"]) for v in versions) == list(range(1, processes + 1))
    assert all(v["status"] == "READY" for v in versions)
    for v in versions:
        assert cli("registry", "verify", f"models:/c/{v['version']}").code == 0
