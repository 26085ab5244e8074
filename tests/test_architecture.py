"""The import layers of docs/architecture.md hold, and no modules import each other in a circle.

The contracts live in pyproject.toml ([tool.importlinter]) and are checked by import-linter;
the cycle check walks import-linter's own graph (grimp), imports inside functions included,
and asks the standard library's topological sorter for an order. Each check is also shown to
fail on a copy of the package with one bad import planted.
"""

from __future__ import annotations

import graphlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parent.parent


def import_cycle(package: str = "lmctl") -> list[str] | None:
    """One circle of module imports in `package` (each module imports the next), or None."""
    import grimp

    graph = grimp.build_graph(package, cache_dir=None)
    sorter = graphlib.TopologicalSorter({m: graph.find_modules_directly_imported_by(m) for m in graph.modules})
    try:
        sorter.prepare()
    except graphlib.CycleError as exc:
        return list(reversed(exc.args[1]))
    return None


def _lint_imports(source_root: Path = REPO) -> subprocess.CompletedProcess[str]:
    """import-linter's CLI on the package found under `source_root` (it puts its working
    directory first on the import path), with this repository's contracts."""
    return subprocess.run([str(Path(sys.executable).with_name("lint-imports")), "--no-cache",
                           str(REPO / "pyproject.toml")], capture_output=True, text=True, timeout=120,
                          cwd=source_root, env={**os.environ, "PYTHONPATH": str(source_root)})


def test_layer_contracts_hold() -> None:
    proc = _lint_imports()
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "2 kept, 0 broken" in proc.stdout


def test_every_module_has_a_layer() -> None:
    """A module missing from the layers contract would escape it: each top-level module and
    package of lmctl is named in exactly one layer."""
    import pkgutil
    import tomllib

    import lmctl

    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c["layers"] for c in contracts if c["type"] == "layers")
    named = [m.strip() for layer in layers for m in layer.replace("|", " ").split()]
    modules = {f"lmctl.{m.name}" for m in pkgutil.iter_modules(lmctl.__path__)}
    assert sorted(named) == sorted(modules)


def test_no_module_imports_itself_through_others() -> None:
    assert import_cycle() is None


@pytest.fixture
def planted(tmp_path: Path) -> Path:
    """A copy of the package in which a shared module imports the CLI inside a function (an
    upward import) and the CLI's `output` already imports that module (so it is also a circle)."""
    copy = tmp_path / "src"
    shutil.copytree(REPO / "lmctl", copy / "lmctl", ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / "lmctl" / "checkpoint.py"
    target.write_text(target.read_text() + "\n\ndef _planted() -> None:\n    from lmctl.cli import output  # noqa: F401\n")
    output = copy / "lmctl" / "cli" / "output.py"
    output.write_text(output.read_text() + "\nfrom lmctl import checkpoint as _planted  # noqa: E402,F401\n")
    return copy


def test_a_planted_upward_import_breaks_the_layers(planted: Path) -> None:
    proc = _lint_imports(planted)
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "lmctl.checkpoint is not allowed to import lmctl.cli" in proc.stdout


def test_a_planted_circle_is_found(planted: Path) -> None:
    code = "import runpy, sys; print(runpy.run_path(sys.argv[1])['import_cycle']())"
    proc = subprocess.run([sys.executable, "-c", code, __file__], capture_output=True, text=True, timeout=120,
                          cwd=planted, env={**os.environ, "PYTHONPATH": str(planted)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "'lmctl.checkpoint'" in proc.stdout and "'lmctl.cli.output'" in proc.stdout, proc.stdout
