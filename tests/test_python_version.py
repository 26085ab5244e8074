"""The Python versions lmctl claims (pyproject's requires-python) are ones it installs and runs on.

The floor was 3.10 while the pinned numpy and scipy need 3.11, and the tests read pyproject.toml
with `tomllib` (3.11): a 3.10 install could not resolve. This checks the floor against every
pinned package's own Requires-Python, as installed here, and that the suite runs on a claimed
version (CI's venv is Python 3.11, the floor, so the CLI-contract tests run under it).
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent


def _floor() -> tuple[SpecifierSet, Version]:
    claimed = SpecifierSet(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"])
    (lower,) = [s for s in claimed if s.operator == ">="]
    return claimed, Version(lower.version)


def _pinned() -> list[str]:
    lines = (REPO / "constraints.txt").read_text().splitlines()
    return [m.group(1) for line in lines if (m := re.match(r"^([A-Za-z0-9_.\-]+)==", line))]


def test_every_pinned_package_installs_on_the_lowest_version_claimed() -> None:
    _, floor = _floor()
    refused = {}
    for name in _pinned():
        try:
            needs = importlib.metadata.metadata(name).get("Requires-Python")
        except importlib.metadata.PackageNotFoundError:  # an extra not installed here
            continue
        if needs and not SpecifierSet(needs).contains(floor):
            refused[name] = needs
    assert not refused, f"requires-python floor {floor} is below what these pins need: {refused}"


def test_the_suite_runs_on_a_claimed_version() -> None:
    claimed, _ = _floor()
    running = ".".join(map(str, sys.version_info[:3]))
    assert claimed.contains(running), f"Python {running} is outside requires-python {claimed}"
