"""The command contract: exit codes, one-line errors without tracebacks, --json, fast --help."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from conftest import run_subprocess

COMMON_FLAGS = {"--json", "--traceback", "--help"}


# What `lmctl --help` may import (issue 21): the CLI modules and the option models its flags are built
# from, behind faces that import nothing else; typer (plain help: its rich renderer costs ~50 ms) and pydantic.
HELP_LMCTL_MODULES = {"lmctl", "lmctl.errors", "lmctl.cli", "lmctl.cli.app", "lmctl.cli.output", "lmctl.cli.fields",
                      "lmctl.cli.help", "lmctl.lazy", "lmctl.distributed", "lmctl.clock", "lmctl.train", "lmctl.train.launch",
                      *(f"lmctl.cli.{c}" for c in ("config", "data", "deploy", "doctor", "drift", "eval", "export",
                                                   "keys", "models", "promote", "registry", "retrain", "serve", "train")),
                      "lmctl.evaluate", "lmctl.evaluate.options", "lmctl.deploy", "lmctl.deploy.options",
                      "lmctl.serve", "lmctl.serve.settings", "lmctl.shares"}
HELP_PACKAGES = {"typer", "shellingham", "annotated_doc", "pydantic", "pydantic_core", "annotated_types",
                 "typing_extensions", "typing_inspection"}


def _imported(*args: str) -> set[str]:
    """Every module `python -X importtime ARGS` imported, minus what the bare interpreter imports."""
    def run(*argv: str) -> set[str]:
        err = subprocess.run([sys.executable, "-X", "importtime", *argv], capture_output=True, text=True,
                             check=True).stderr
        return {line.rsplit("|", 1)[1].strip() for line in err.splitlines() if line.startswith("import time:")}

    return run(*args) - run("-c", "pass")


def test_help_imports_only_the_cli_and_its_option_models() -> None:
    imported = _imported("-m", "lmctl", "--help")
    assert "lmctl.cli.app" in imported  # the probe really ran the CLI
    assert {m for m in imported if m.split(".")[0] == "lmctl"} <= HELP_LMCTL_MODULES, \
        sorted({m for m in imported if m.split(".")[0] == "lmctl"} - HELP_LMCTL_MODULES)
    # importtime also lists failed attempts (copy.py tries Jython's `org.python.core`): keep what exists
    packages = {m.split(".")[0] for m in imported if not m.startswith("_")} - set(sys.stdlib_module_names) - {"lmctl"}
    packages = {p for p in packages if importlib.util.find_spec(p) is not None}
    assert packages <= HELP_PACKAGES, sorted(packages - HELP_PACKAGES)


def test_missing_config_is_bad_input(cli, tmp_path: Path) -> None:
    result = cli("train", tmp_path / "nope.yaml")
    assert result.code == 2
    assert "config file not found" in result.err and "Traceback" not in result.err


def test_malformed_yaml_names_the_line(cli, tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  base: x\ndata: [unclosed\n")
    result = cli("config", "validate", path)
    assert result.code == 2
    assert f"{path}:" in result.err and "malformed YAML" in result.err


def test_unknown_key_is_named(cli, tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("lora:\n  rank: 8\n")
    result = cli("config", "validate", path, "--json")
    assert result.code == 2
    assert "lora.rank: unknown key" in result.err
    assert result.out == ""


def test_missing_model_ref_is_bad_input(cli, tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello"}\n')
    for ref in (str(tmp_path / "no-such-dir"), "models:/nothing/1", "models:/nothing@production", "models:bad"):
        result = cli("eval", ref, "--data", data)
        assert result.code == 2, (ref, result.err)
        assert "Traceback" not in result.err


def test_usage_error_is_exit_2(cli) -> None:
    assert cli("train").code == 2
    assert cli("no-such-command").code == 2


def test_config_show_json_is_one_object(cli, tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.001\n")
    result = cli("config", "show", path, "--json")
    assert result.code == 0
    assert json.loads(result.out)["train"]["lr"] == 0.001


def test_subprocess_errors_have_no_traceback_unless_asked(tmp_path: Path) -> None:
    plain = run_subprocess("train", str(tmp_path / "nope.yaml"))
    assert plain.returncode == 2
    assert plain.stderr.strip().count("\n") == 0 and plain.stderr.startswith("lmctl: error:")
    traced = run_subprocess("train", str(tmp_path / "nope.yaml"), "--traceback")
    assert traced.returncode == 2 and "Traceback" in traced.stderr


def test_eval_serve_deploy_flags_take_default_and_help_from_their_option_models() -> None:
    """Each option of these commands is a field of the model the library takes: same help, same default."""
    import typer

    from lmctl.cli.app import app
    from lmctl.deploy.options import DeployOptions, TrainJobOptions
    from lmctl.evaluate.options import EvalGates, EvalOptions
    from lmctl.serve.settings import CanaryPolicy, RolloutPolicy, ServeSettings
    from lmctl.train.launch import LaunchOptions

    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    own = {"eval": {"--data"}, "deploy": {"--target", "--out", "--force"}, "serve": set(),
           "train": {"--set", "--resume", "--dry-run", "--emit", "--out", "--force", "--nodes"}}
    models = {"eval": (EvalOptions, EvalGates), "serve": (ServeSettings, CanaryPolicy, RolloutPolicy), "deploy": (DeployOptions,),
              "train": (TrainJobOptions, LaunchOptions)}
    for name, classes in models.items():
        fields = {f.description: f for cls in classes for f in cls.model_fields.values()}
        options = [p for p in commands[name].params if p.param_type_name == "option"]
        checked = 0
        for param in options:
            if set(param.opts) & (COMMON_FLAGS | own[name]):
                continue
            assert param.help in fields, (name, param.opts, param.help)
            default = fields[param.help].get_default(call_default_factory=True)
            assert param.default == default or (param.default is None and default in ([], {})), (name, param.opts)
            checked += 1
        assert checked >= 12, (name, checked)


def test_option_model_errors_name_the_flag(cli, tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello"}\n')
    cases = [(("eval", tmp_path, "--data", data, "--batch-size", "0"), "--batch-size: "),
             (("eval", tmp_path, "--data", data, "--method", "sliding"), "--method: "),
             (("serve", tmp_path, "--canary-window", "-1"), "--canary-window: "),
             (("serve", tmp_path, "--request-timeout", "0"), "--request-timeout: "),
             (("deploy", tmp_path, "--target", "local", "--out", tmp_path / "o", "--port", "0"), "--port: ")]
    for args, expected in cases:
        result = cli(*args)
        assert result.code == 2 and expected in result.err and "Traceback" not in result.err, (args, result.err)
    assert not (tmp_path / "o").exists()


def test_help_reads_as_conventional_help() -> None:
    """Sections per group, metavars that say what to type (no Python types), examples on the heavy commands."""
    import typer

    from lmctl.cli import main
    from lmctl.cli.app import app

    def help_of(*command: str) -> str:
        import contextlib
        import io

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main([*command, "--help"]) == 0
        return out.getvalue()

    train = help_of("train")
    assert train.startswith("Usage: lmctl train [OPTIONS] CONFIG\n")
    for line in ("--set KEY=VALUE", "--resume auto|never|PATH", "--nnodes N|MIN:MAX", "--rdzv-timeout SECONDS",
                 "--rdzv-endpoint HOST[:PORT]"):
        assert line in train, line
    sections = [s for s in train.splitlines() if s and not s.startswith(" ") and s.endswith(":")]
    assert sections == ["Arguments:", "Options:", "Several processes (torchrun):", "Cluster job (--emit kubernetes):",
                        "Output:", "Examples:"], sections
    assert "--nodes" not in train.replace("--nodes pods", "")  # one name: --nnodes; the old one is hidden
    for name in ("eval", "serve", "deploy", "retrain"):
        assert "\nExamples:\n  lmctl " + name in help_of(name), name

    def walk(command: object, path: list[str]) -> None:
        if hasattr(command, "commands"):
            for child_name, child in command.commands.items():  # type: ignore[attr-defined]
                walk(child, path + [child_name])
            return
        text = help_of(*path)
        assert "<" not in text.split("Examples:")[0].replace("<=", ""), (path, text)  # no `<int>`, `<list[str]>`
        assert "{" not in text.splitlines()[0], (path, text.splitlines()[0])  # no `{config}` in the usage line

    walk(typer.main.get_command(app), [])


def test_usage_errors_are_one_line_with_exit_2(cli) -> None:
    """Unknown flag, missing argument, out-of-range value, unknown command: the one `lmctl: error:`
    line every other error prints (not click's Usage/Try/Error block), stdout empty even with --json."""
    cases = [(("train", "--bogus"), "No such option: --bogus", "lmctl train --help"),
             (("eval", "--json"), "Missing argument 'MODEL_REF'", "lmctl eval --help"),
             (("serve", "x", "--port", "notanumber", "--json"), "--port", "lmctl serve --help"),
             (("registry", "history", "m", "--limit", "x"), "--limit", "lmctl registry history --help"),
             (("no-such-command",), "No such command 'no-such-command'", "lmctl --help")]
    for args, says, where in cases:
        result = cli(*args)
        assert result.code == 2, (args, result.err)
        lines = result.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("lmctl: error: ") and says in lines[0], (args, result.err)
        assert f"(see `{where}`)" in lines[0] and "Usage:" not in result.err and result.out == "", args


def test_policy_refusal_without_a_result_still_prints_one_json_object(capsys) -> None:  # type: ignore[no-untyped-def]
    """The boundary's rule for exit 3 holds for a refusal whose command printed nothing (e.g. a rollback
    that lost a race): one JSON object on stdout under --json, nothing without it."""
    from lmctl.cli import _print_refusal
    from lmctl.cli.output import reset_printed
    from lmctl.errors import PolicyError

    reset_printed()
    _print_refusal(PolicyError("alias 'production' of 'm' moved to v3 meanwhile", hint="run it again"), as_json=False)
    assert capsys.readouterr().out == ""
    _print_refusal(PolicyError("alias 'production' of 'm' moved to v3 meanwhile", hint="run it again"), as_json=True)
    assert json.loads(capsys.readouterr().out) == {"refused": True, "error": "alias 'production' of 'm' moved to v3 meanwhile",
                                                   "hint": "run it again", "exit_code": 3}
