"""A `lmctl register` killed with SIGKILL at any point leaves no usable half-version: what
it left shows as FAILED, is never resolved or promoted, and the next register removes it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from conftest import ASSETS, run_subprocess
from lmctl import tracking, versions


def _killed_register(ckpt: Path, point: str) -> None:
    proc = run_subprocess("register", str(ckpt), "--name", "k", "--json", env={"LMCTL_REGISTER_CRASH_AT": point})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert proc.stdout == ""


def _versions(cli) -> list[dict]:  # type: ignore[no-untyped-def]
    listed = cli("registry", "list", "--json")
    assert listed.code == 0, listed.err
    return listed.json["versions"]


def _deleted_runs() -> list[str]:
    from mlflow.entities import ViewType

    from lmctl.registry.register import EXPERIMENT

    client = tracking.client()
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    runs = client.search_runs([experiment], run_view_type=ViewType.DELETED_ONLY, order_by=["attributes.start_time ASC"])
    return [r.info.run_id for r in runs]


def test_sigkilled_registers_leave_nothing_usable_and_are_cleaned(cli, trained_checkpoint: Path) -> None:
    _killed_register(trained_checkpoint, "after_version")
    [failed] = _versions(cli)
    assert (failed["version"], failed["status"], failed["usable"]) == ("1", "FAILED", False)
    refused = cli("eval", "models:/k/1", "--data", ASSETS / "tiny_validation.jsonl")
    assert refused.code == 4 and "registration did not finish" in refused.err
    assert cli("promote", "k", "1").code == 4
    assert cli("registry", "verify", "models:/k/1").code == 4

    _killed_register(trained_checkpoint, "after_card")  # its start removes v1; it dies before `ready`
    assert [(v["version"], v["usable"]) for v in _versions(cli)] == [("2", False)]
    _killed_register(trained_checkpoint, "after_upload")  # removes v2; dies before creating a version
    assert _versions(cli) == []

    done = cli("register", trained_checkpoint, "--name", "k", "--alias", "candidate", "--json")
    assert done.code == 0, done.err
    assert done.json["cleaned"] == [f"run {_deleted_runs()[-1]}"]  # the after_upload one; earlier ones went before
    home = Path(os.environ["LMCTL_HOME"])
    assert len(_deleted_runs()) == 3  # every killed registration's run, artifacts and all
    assert not any((home / "mlartifacts" / run_id).exists() for run_id in _deleted_runs())
    [ready] = _versions(cli)
    assert (ready["version"], ready["status"], ready["usable"], ready["aliases"]) == ("3", "READY", True, ["candidate"])
    assert cli("registry", "verify", "models:/k@candidate").code == 0


def test_a_live_registration_is_pending_not_failed() -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = {**versions.registrar_tags(), "lmctl.register_pid": str(sleeper.pid),
                 "lmctl.register_start": versions._process_start(sleeper.pid) or ""}
        assert versions.registrar_gone(alive) is False
        assert versions.registrar_gone({**alive, "lmctl.register_start": "1"}) is True  # pid reused by another process
    finally:
        sleeper.kill()
        sleeper.wait()
    assert versions.registrar_gone(alive) is True
    elsewhere = {**alive, "lmctl.register_host": socket.gethostname() + "-other"}
    assert versions.registrar_gone(elsewhere) is False  # cannot ask another host: wait for the grace period
    assert versions.registrar_gone({**elsewhere, "lmctl.register_at": f"{time.time() - versions.STALE_AFTER_S - 1:.0f}"})
