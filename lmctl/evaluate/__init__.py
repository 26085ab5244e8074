"""`lmctl eval`: measure a MODEL_REF on a data file and write a versioned JSON report.

The package's names are imported lazily (PEP 562): every CLI command imports
`lmctl.evaluate.options` for its flags, and a package `__init__` that imported `run`
would make each of them pay for the report schema, suites (yaml), comparison and data
modules at start-up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmctl import lazy

if TYPE_CHECKING:
    from lmctl.evaluate.options import EvalGates, EvalOptions, Method
    from lmctl.evaluate.run import evaluate
    from lmctl.evaluate.schema import REPORT_SCHEMA, EvalReport, LoadedReport, load_eval_report

_EXPORTS = {"EvalGates": "options", "EvalOptions": "options", "Method": "options", "evaluate": "run",
            "REPORT_SCHEMA": "schema", "EvalReport": "schema", "LoadedReport": "schema",
            "load_eval_report": "schema"}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy.exports(__name__, _EXPORTS)
