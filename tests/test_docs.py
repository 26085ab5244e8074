"""The docs/ pages stay in step with the code: config keys, commands and flags, links.

Each check reads the code's own definitions (the pydantic config models, the typer command
tree), so a field or flag added without documentation fails here with what to add.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
COMMON_FLAGS = {"--json", "--traceback", "--help"}
LINK_RE = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _config_doc_script() -> Any:
    spec = importlib.util.spec_from_file_location("config_doc", REPO / "scripts" / "config_doc.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _config_keys() -> list[str]:
    from lmctl.config import LmctlConfig

    return [f"{section}.{key}" for section, field in LmctlConfig.model_fields.items()
            for key in field.annotation.model_fields]  # type: ignore[union-attr]


def test_every_config_key_is_documented() -> None:
    text = (DOCS / "configuration.md").read_text(encoding="utf-8")
    missing = [key for key in _config_keys() if f"`{key}`" not in text]
    assert not missing, f"config keys missing from docs/configuration.md: {missing}; run `python scripts/config_doc.py --write`"


def test_config_reference_is_generated_from_the_code() -> None:
    script = _config_doc_script()
    text = (DOCS / "configuration.md").read_text(encoding="utf-8")
    assert script.current_block(text) == script.render(), "run `python scripts/config_doc.py --write`"


def _leaf_commands() -> dict[str, list[str]]:
    """'registry verify' -> its long flags, for every command lmctl has."""
    import typer

    from lmctl.cli.app import app

    leaves: dict[str, list[str]] = {}

    def walk(command: Any, path: list[str]) -> None:
        if hasattr(command, "commands"):
            for name, child in command.commands.items():
                walk(child, path + [name])
            return
        flags = [opt for param in command.params if param.param_type_name == "option"
                 for opt in param.opts if opt.startswith("--") and opt not in COMMON_FLAGS]
        leaves[" ".join(path)] = flags

    walk(typer.main.get_command(app), [])
    return leaves


def _sections(text: str) -> dict[str, str]:
    """'## lmctl NAME' heading -> the text up to the next '## ' heading."""
    parts = re.split(r"^## lmctl (.+)$", text, flags=re.M)
    return {parts[i].strip(): parts[i + 1].split("\n## ")[0] for i in range(1, len(parts), 2)}


def test_every_command_and_flag_is_documented() -> None:
    sections = _sections((DOCS / "commands.md").read_text(encoding="utf-8"))
    leaves = _leaf_commands()
    assert len(leaves) >= 20  # the walk found the real tree, not an empty group
    missing_commands = sorted(set(leaves) - set(sections))
    assert not missing_commands, f"docs/commands.md has no '## lmctl CMD' section for {missing_commands}"
    missing_flags = {cmd: [f for f in flags if not re.search(rf"`{re.escape(f)}[` ]", sections[cmd])]
                     for cmd, flags in leaves.items()}
    missing_flags = {cmd: flags for cmd, flags in missing_flags.items() if flags}
    assert not missing_flags, f"flags missing from their command's section of docs/commands.md: {missing_flags}"
    stale = sorted(set(sections) - set(leaves))
    assert not stale, f"docs/commands.md documents commands lmctl does not have: {stale}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_slug(m) for m in re.findall(r"^#+ (.+)$", page.read_text(encoding="utf-8"), flags=re.M)}


@pytest.mark.parametrize("page", [REPO / "README.md", *sorted(DOCS.glob("*.md"))], ids=lambda p: p.name)
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in LINK_RE.findall(page.read_text(encoding="utf-8")):
        if re.match(r"^[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        path_part, _, anchor = target.partition("#")
        linked = (page.parent / path_part).resolve() if path_part else page
        if not linked.exists() or not linked.is_relative_to(REPO):
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(target)
    assert not broken, f"{page.name}: links that point nowhere (or outside the repository): {broken}"


def test_nothing_cites_the_old_external_design_file() -> None:
    needle = "DESIGN" + ".md"  # spelled in two parts so this file does not match itself
    hits = [str(p.relative_to(REPO)) for folder in ("lmctl", "tests", "scripts", "docs", "examples", "configs")
            for p in (REPO / folder).rglob("*") if p.is_file() and p.suffix in (".py", ".md", ".yaml", ".yml", ".txt")
            and needle in p.read_text(encoding="utf-8", errors="replace")]
    hits += ["README.md"] if needle in (REPO / "README.md").read_text(encoding="utf-8") else []
    assert not hits, f"these files cite a design file outside the repository; point them at docs/: {hits}"


def test_every_json_key_is_documented() -> None:
    """The top-level `--json` keys recorded by test_json_contract.py appear in their command's section."""
    from test_json_contract import EXPECTED

    sections = _sections((DOCS / "commands.md").read_text(encoding="utf-8"))
    missing: dict[str, list[str]] = {}
    for label, keys in EXPECTED.items():
        command = re.split(r" \(| --", label)[0].removesuffix(" local").removesuffix(" kubernetes")
        in_code = set(re.findall(r"\w+", " ".join(re.findall(r"`[^`]*`", sections[command]))))
        absent = sorted(k for k in keys if "." not in k and "[]" not in k and k not in in_code)
        if absent:
            missing[label] = absent
    assert not missing, f"--json keys missing from their command's section of docs/commands.md: {missing}"


def _readme_commands() -> list[str]:
    """Every `lmctl ...` the README shows: lines of its code blocks and inline code spans."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```\w*\n(.*?)```", text, flags=re.S)
    lines = [line.split("#")[0].strip() for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    spans = re.findall(r"`(lmctl [^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return [c for c in lines + spans if c.startswith("lmctl ")]


@pytest.mark.parametrize("source", ["README.md", "--help examples"])
def test_every_command_the_readme_and_help_show_exists(source: str) -> None:
    from lmctl.cli.app import EXAMPLES

    leaves = _leaf_commands()
    if source == "README.md":
        shown = _readme_commands()
        assert len(shown) >= 15  # the walk and the command table were found
    else:
        shown = [line.strip().split("#")[0].strip() for text in EXAMPLES.values() for line in text.splitlines()[1:]]
        shown = [c.removeprefix("LMCTL_API_KEYS=sk-1 ") for c in shown]
        assert len(shown) >= 10 and all(c.startswith("lmctl ") for c in shown), shown
    problems = []
    for command in shown:
        words = command.replace("\\|", "|").split()[1:]
        first = [w for w in words[0].split("|")]
        for alt in first:
            path = [alt] + ([words[1].split("|")[0]] if len(words) > 1 and f"{alt} {words[1].split('|')[0]}" in leaves else [])
            name = " ".join(path)
            if name not in leaves:
                problems.append(f"{command!r}: no command `lmctl {name}`")
                continue
            flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", command)) - COMMON_FLAGS
            unknown = sorted(f for f in flags if f not in leaves[name])
            if unknown and len(first) == 1:
                problems.append(f"{command!r}: `lmctl {name}` has no {unknown}")
    assert not problems, f"{source} shows commands lmctl does not have: {problems}"
