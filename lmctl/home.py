"""Where lmctl keeps its state: `LMCTL_HOME` (default `./.lmctl`), always as an absolute path.

Cron jobs start in another working directory than the person who set them up, so every
path derived here is resolved once to an absolute path.
"""

from __future__ import annotations

import os
from pathlib import Path


def lmctl_home() -> Path:
    """The state directory, created on first use."""
    home = Path(os.environ.get("LMCTL_HOME", ".lmctl")).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def models_dir() -> Path:
    """Converted base models pulled by `lmctl models pull`."""
    return lmctl_home() / "models"


def cache_dir() -> Path:
    """Registry artifacts downloaded for `models:/` references."""
    return lmctl_home() / "cache"
