"""8 concurrent `lmctl register` processes on one fresh embedded registry."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_eight_concurrent_registers_make_eight_versions(cli, trained_checkpoint: Path) -> None:
    procs = [subprocess.Popen([sys.executable, "-m", "lmctl", "register", str(trained_checkpoint), "--name", "c", "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(8)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = [p.returncode for p in procs]
    assert codes == [0] * 8, [err[-500:] for _, err in outs]
    versions = cli("registry", "list", "c", "--json").json["versions"]
    assert sorted(int(v["version"]) for v in versions) == list(range(1, 9))
    assert all(v["status"] == "READY" for v in versions)
    for v in versions:
        assert cli("registry", "verify", f"models:/c/{v['version']}").code == 0
