"""examples/schedules: the crontab line, the systemd units and the GitHub Actions workflow
are well-formed, and the commands they contain really run `lmctl retrain` on a tiny config."""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ASSETS, REPO

SCHEDULES = REPO / "examples" / "schedules"
PREFIX = "/srv/lmctl"  # where the examples assume the checkout lives
CRON_FIELD = re.compile(r"^(\*|\d+(-\d+)?)(/\d+)?(,(\d+(-\d+)?)(/\d+)?)*$")


def crontab() -> tuple[dict[str, str], list[tuple[list[str], str]]]:
    """(environment lines, jobs as (five time fields, command))."""
    env, jobs = {}, []
    for line in (SCHEDULES / "crontab").read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if re.match(r"^[A-Z_]+=", line):
            key, _, value = line.partition("=")
            env[key] = value
        else:
            parts = line.split(None, 5)
            jobs.append((parts[:5], parts[5]))
    return env, jobs


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string((SCHEDULES / name).read_text())
    return parser


def workflow() -> dict:
    return yaml.safe_load((SCHEDULES / "github-actions-retrain.yml").read_text())


def test_crontab_line_is_well_formed() -> None:
    env, jobs = crontab()
    assert len(jobs) == 1
    fields, command = jobs[0]
    assert len(fields) == 5 and all(CRON_FIELD.match(f) for f in fields), fields
    assert "lmctl retrain" in command and "--json" in command
    assert "flock" not in command  # lmctl's own lock makes an overlapping run exit 5
    assert "%" not in command  # cron turns % into newlines
    assert env["LMCTL_HOME"].startswith(PREFIX)


def test_systemd_units_are_well_formed() -> None:
    service, timer = unit("lmctl-retrain.service"), unit("lmctl-retrain.timer")
    assert service["Service"]["Type"] == "oneshot"
    argv = shlex.split(service["Service"]["ExecStart"])
    assert argv[0].endswith("/lmctl") and argv[1] == "retrain" and "--json" in argv
    assert set(service["Service"]["SuccessExitStatus"].split()) == {"3", "5"}
    assert timer["Timer"]["Persistent"] == "true"
    assert timer["Timer"]["Unit"] == "lmctl-retrain.service"
    assert timer["Install"]["WantedBy"] == "timers.target"
    on_calendar = timer["Timer"]["OnCalendar"]
    if shutil.which("systemd-analyze"):  # systemd's own parser, where it is installed
        checked = subprocess.run(["systemd-analyze", "calendar", on_calendar], capture_output=True, text=True, check=False)
        assert checked.returncode == 0 and "Next elapse" in checked.stdout, checked.stderr


def _verify_units(root: Path) -> subprocess.CompletedProcess[str]:
    units = root / "etc" / "systemd" / "system"
    return subprocess.run(["systemd-analyze", "verify", f"--root={root}", str(units / "lmctl-retrain.service"),
                           str(units / "lmctl-retrain.timer")], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd is not installed on this machine")
def test_systemd_analyze_verifies_the_units(tmp_path: Path) -> None:
    """`systemd-analyze verify` on the units as shipped, installed into a scratch root that has
    systemd's own units and an executable where ExecStart expects lmctl (verify checks it exists)."""
    root = tmp_path / "root"
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    units = root / "etc" / "systemd" / "system"
    units.mkdir(parents=True)
    for name in ("lmctl-retrain.service", "lmctl-retrain.timer"):
        shutil.copy(SCHEDULES / name, units / name)
    exec_start = Path(shlex.split(unit("lmctl-retrain.service")["Service"]["ExecStart"])[0])
    stand_in = root / exec_start.relative_to("/")
    stand_in.parent.mkdir(parents=True)
    stand_in.write_text("#!/bin/sh\n")
    stand_in.chmod(0o755)
    verified = _verify_units(root)
    assert verified.returncode == 0, verified.stderr
    timer = (units / "lmctl-retrain.timer").read_text()
    (units / "lmctl-retrain.timer").write_text(timer.replace("OnCalendar=*-*-* 03:17:00", "OnCalendar=*-*-* 25:99:00"))
    broken = _verify_units(root)  # the same check refuses a broken unit
    assert broken.returncode != 0 and "calendar" in broken.stderr


def test_check_jsonschema_accepts_the_github_workflow(tmp_path: Path) -> None:
    """check-jsonschema's vendored GitHub Actions workflow schema (SchemaStore), offline."""

    def check(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows",
                               str(path)], capture_output=True, text=True, timeout=120)

    shipped = check(SCHEDULES / "github-actions-retrain.yml")
    assert shipped.returncode == 0, shipped.stdout + shipped.stderr
    text = (SCHEDULES / "github-actions-retrain.yml").read_text()
    assert "    runs-on: [self-hosted, lmctl]\n" in text
    # a job without a runner (edited as text: PyYAML would also turn the `on:` key into `true:`)
    (tmp_path / "broken.yml").write_text(text.replace("    runs-on: [self-hosted, lmctl]\n", ""))
    refused = check(tmp_path / "broken.yml")
    assert refused.returncode != 0 and "runs-on" in refused.stdout + refused.stderr


def test_github_workflow_runs_retrain_and_branches_on_its_exit_code() -> None:
    flow = workflow()
    triggers = flow.get("on", flow.get(True))  # YAML 1.1 reads a bare `on` key as True
    assert triggers["schedule"][0]["cron"].count(" ") == 4 and "workflow_dispatch" in triggers
    assert flow["concurrency"]["cancel-in-progress"] is False
    steps = flow["jobs"]["retrain"]["steps"]
    step = next(s for s in steps if s.get("id") == "retrain")
    script = step["run"]
    assert "lmctl retrain" in script and "--json" in script
    for code in ("0)", "3)", "5)", "*)"):
        assert code in script
    assert any(s.get("if") == "always()" for s in steps)  # the result is kept even when the step fails


def _checkout(tmp_path: Path, tiny_config: Path) -> Path:
    """What the examples expect at /srv/lmctl: .venv/bin/lmctl, configs/retrain.yaml, logs/."""
    root = tmp_path / "srv-lmctl"
    (root / ".venv" / "bin").mkdir(parents=True)
    (root / ".venv" / "bin" / "lmctl").symlink_to(Path(sys.executable).parent / "lmctl")
    (root / "configs").mkdir()
    (root / "logs").mkdir()
    cfg = yaml.safe_load(tiny_config.read_text())
    cfg["retrain"] = {"eval_data": str(ASSETS / "tiny_validation.jsonl")}
    (root / "configs" / "retrain.yaml").write_text(yaml.safe_dump(cfg))
    return root


def _here(value: str, root: Path) -> str:
    return value.replace(PREFIX, str(root))


@pytest.mark.skipif(not (Path(sys.executable).parent / "lmctl").exists(), reason="lmctl console script not installed")
def test_the_scheduled_commands_really_run(tmp_path: Path, tiny_config: Path, lmctl_home: Path) -> None:
    import json

    from filelock import FileLock

    root = _checkout(tmp_path, tiny_config)
    base_env = {k: v for k, v in os.environ.items() if k != "LMCTL_HOME"}

    # cron: the job line through /bin/sh with the crontab's environment -> first production
    env, jobs = crontab()
    cron_env = {**base_env, **{k: _here(v, root) for k, v in env.items() if k != "PATH"}}
    ran = subprocess.run(["/bin/sh", "-c", _here(jobs[0][1], root)], env=cron_env, timeout=600, check=False)
    assert ran.returncode == 0, (root / "logs" / "retrain.log").read_text()[-2000:]
    result = json.loads((root / "logs" / "retrain.jsonl").read_text().splitlines()[-1])
    assert result["result"] == "promoted"
    home = cron_env["LMCTL_HOME"]

    # systemd: ExecStart without a shell, in WorkingDirectory, with Environment= -> data unchanged
    service = unit("lmctl-retrain.service")["Service"]
    key, _, value = service["Environment"].partition("=")
    ran = subprocess.run([_here(a, root) for a in shlex.split(service["ExecStart"])], capture_output=True, text=True, check=False,
                         cwd=_here(service["WorkingDirectory"], root), env={**base_env, key: _here(value, root)}, timeout=600)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert json.loads(ran.stdout)["result"] == "skipped"

    # GitHub Actions: the step's script as the runner runs it (bash -eo pipefail), per exit code
    step = next(s for s in workflow()["jobs"]["retrain"]["steps"] if s.get("id") == "retrain")
    script = tmp_path / "step.sh"
    script.write_text(step["run"])
    outputs = tmp_path / "github_output"

    def run_step(config_text: str | None = None) -> subprocess.CompletedProcess[str]:
        if config_text is not None:
            (root / "configs" / "retrain.yaml").write_text(config_text)
        outputs.write_text("")
        return subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)], cwd=root,
                              capture_output=True, text=True, timeout=600, check=False,
                              env={**base_env, "LMCTL_HOME": home, "GITHUB_OUTPUT": str(outputs)})

    if shutil.which("jq") is None:
        pytest.skip("jq is not installed; the workflow step reads the result with it")
    ok = run_step()
    assert ok.returncode == 0 and "exit_code=0" in outputs.read_text() and "retrain: skipped" in ok.stdout, ok.stderr
    with FileLock(str(Path(home) / "retrain" / "tiny.lock")):  # another retrain holds the lock
        busy = run_step()
    assert busy.returncode == 0 and "exit_code=5" in outputs.read_text() and "::notice" in busy.stdout, busy.stderr
    broken = run_step("registry: {name: tiny}\nlora: {rank: 8}\n")
    assert broken.returncode == 2 and "exit_code=2" in outputs.read_text() and "::error" in broken.stdout
