"""`lmctl doctor`."""

from __future__ import annotations

from lmctl.cli.output import JsonOpt, TracebackOpt, emit


def doctor(json_out: JsonOpt = False, traceback: TracebackOpt = False) -> None:
    """Check the environment: libraries, accelerator, LMCTL_HOME, registry, pulled models."""
    from lmctl.doctor import run_checks

    emit(run_checks(), json_out)
