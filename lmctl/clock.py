"""UTC timestamps, one format everywhere lmctl writes a time (manifests, reports, histories,
events, run ids), so they sort as text and read the same on every host; and the durations
lmctl reads from environment variables, checked the same way."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from typing import Literal

from lmctl.errors import BadInputError


def utc_now(timespec: Literal["seconds", "milliseconds"] = "seconds") -> str:
    """ISO 8601 with offset, e.g. 2026-12-03T09:53:53+00:00."""
    return datetime.now(timezone.utc).isoformat(timespec=timespec)


def utc_stamp() -> str:
    """Compact and path-safe, for directory names and run ids, e.g. 20261203T095353."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")


def seconds_from_env(name: str, default: float) -> float:
    """A duration in seconds from environment variable `name` (`default` when unset or
    empty); anything but a number > 0 is bad input (exit 2)."""
    raw = os.environ.get(name)
    try:
        value = float(raw) if raw else default
    except ValueError:
        value = -1.0
    if not value > 0:
        raise BadInputError(f"{name}={raw!r}: expected a number of seconds > 0")
    return value
