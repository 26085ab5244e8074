"""How commands print: one JSON object on stdout with --json, else a readable summary.

Logs and progress go to stderr so stdout stays machine-readable in CI pipelines.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Annotated, Any

import typer
from pydantic import BaseModel

_RANK = 0  # this process's torchrun rank, set by setup_logging
LOG_RANKS_ENV = "LMCTL_LOG_RANKS"
JsonOpt = Annotated[bool, typer.Option("--json", help="Print exactly one JSON object (the result) on stdout.")]
TracebackOpt = Annotated[bool, typer.Option("--traceback", help="Show the Python traceback of a failure.")]


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is at emit time (it may be swapped after setup, e.g. by capture)."""

    @property  # type: ignore[override]
    def stream(self):  # type: ignore[no-untyped-def]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:  # type: ignore[no-untyped-def]
        pass


def setup_logging(verbose: bool = False, rank: int = 0) -> None:
    """Send lmctl's log lines to stderr; keep chatty libraries at warning level. Under torchrun,
    rank 0 logs as one process does; the others only warnings and errors, named by rank
    (`LMCTL_LOG_RANKS=all`: every rank logs everything, named, to see what each one did)."""
    global _RANK
    _RANK = rank
    root = logging.getLogger("lmctl")
    if not root.handlers:
        root.addHandler(_StderrHandler())
    for handler in root.handlers:
        handler.setFormatter(logging.Formatter(f"lmctl[rank {rank}]: %(message)s" if rank else "lmctl: %(message)s"))
    quiet = rank and os.environ.get(LOG_RANKS_ENV, "").lower() != "all"
    root.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
    for name in ("transformers", "mlflow", "alembic", "peft", "datasets", "httpx", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # datasets' file readers log "Failed to read file ..." just before they raise; lmctl
    # reports that error itself as one line (lmctl.data.sources), so the log would repeat it.
    logging.getLogger("datasets.packaged_modules").setLevel(logging.CRITICAL)


def _plain(result: BaseModel | dict[str, Any]) -> dict[str, Any]:
    return result.model_dump(mode="json") if isinstance(result, BaseModel) else result


def _human_lines(data: Any, indent: str = "") -> list[str]:
    lines: list[str] = []
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(f"{indent}{key}:")
            lines.extend(_human_lines(value, indent + "  "))
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            lines.append(f"{indent}{key}:")
            for item in value:  # one "- " bullet per item, its other keys aligned under it
                item_lines = _human_lines(item, indent + "    ")
                if item_lines:
                    item_lines[0] = indent + "  - " + item_lines[0].lstrip()
                lines.extend(item_lines)
        else:
            shown = f"{value:.6g}" if isinstance(value, float) else value
            lines.append(f"{indent}{key}: {shown}")
    return lines


class _Printed:
    """Whether this invocation has written its result to stdout yet (the CLI boundary asks, on exit 3)."""

    result = False


def reset_printed() -> None:
    _Printed.result = False


def printed() -> bool:
    return _Printed.result


def emit(result: BaseModel | dict[str, Any], as_json: bool) -> None:
    """Write the command's result to stdout, as JSON or as indented key: value lines; under
    torchrun on rank 0 alone, so stdout holds one result whatever the number of processes."""
    if _RANK:
        return
    _Printed.result = True
    data = _plain(result)
    if as_json:
        sys.stdout.write(json.dumps(data, sort_keys=False) + "\n")
    else:
        sys.stdout.write("\n".join(_human_lines(data)) + "\n")
    sys.stdout.flush()
