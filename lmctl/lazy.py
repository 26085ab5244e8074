"""A package's names imported on first use (PEP 562), so a CLI that imports the package for
its light option models does not pay for the heavy modules behind it (`lmctl.evaluate`,
`lmctl.train`)."""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import Any


def exports(package: str, names: dict[str, str]) -> Callable[[str], Any]:
    """The module `__getattr__` of `package`: NAME -> getattr(package.MODULE, NAME), for names = {NAME: MODULE}."""

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(f"{package}.{names[name]}"), name)

    return __getattr__
