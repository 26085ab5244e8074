"""UTC timestamps, one format everywhere lmctl writes a time (manifests, reports, histories,
events, run ids), so they sort as text and read the same on every host."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Literal


def utc_now(timespec: Literal["seconds", "milliseconds"] = "seconds") -> str:
    """ISO 8601 with offset, e.g. 2026-12-03T09:53:53+00:00."""
    return datetime.now(timezone.utc).isoformat(timespec=timespec)


def utc_stamp() -> str:
    """Compact and path-safe, for directory names and run ids, e.g. 20261203T095353."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
