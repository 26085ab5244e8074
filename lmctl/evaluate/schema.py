"""The eval report (schema lmctl.eval/1) as typed objects, and the one way to read one back.

`lmctl eval --report` writes it; `lmctl register --eval` and `lmctl promote --eval` (and
retrain, through them) read it with `load_eval_report`, which also returns what the audit
history records of the file (its path and sha256).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ValidationError

from lmctl.checkpoint import DataFingerprint
from lmctl.errors import DataError
from lmctl.evaluate.compare import Comparison, Gate
from lmctl.evaluate.latency import LatencyReport
from lmctl.evaluate.options import Method
from lmctl.evaluate.suites import SuiteResult

REPORT_SCHEMA = "lmctl.eval/1"


class RegistryRef(BaseModel):
    """A registry version: `models:/NAME/VERSION`."""

    name: str
    version: str

    def __str__(self) -> str:
        return f"models:/{self.name}/{self.version}"


class ModelIdentity(BaseModel):
    """Which exact model a measurement is about: its registry version and the sha256 of its
    lmctl.json (for a local checkpoint), so a report can be matched to a version."""

    model: str
    registry: RegistryRef | None = None
    manifest_sha256: str | None = None

    def describe(self) -> str:
        if self.registry:
            return str(self.registry)
        return f"a checkpoint with lmctl.json sha256 {self.manifest_sha256[:16]}…" if self.manifest_sha256 else self.model

    def is_version(self, name: str, version: str, manifest_sha256: str | None) -> bool:
        """Whether this names registry version NAME/VERSION (whose lock hash is `manifest_sha256`)."""
        if self.registry:
            return self.registry.name == name and self.registry.version == version
        return bool(self.manifest_sha256) and self.manifest_sha256 == manifest_sha256


class BaselineSummary(ModelIdentity):
    """The baseline measured on the same data with the same windows."""

    perplexity: float
    word_perplexity: float
    byte_perplexity: float
    bits_per_byte: float
    nll_per_token: float


class EvalMethod(BaseModel):
    name: Method
    max_length: int
    stride: int
    prefix_token: str
    batch_size: int | None = None


class EvalReport(BaseModel):
    schema_version: str = REPORT_SCHEMA
    model: str
    model_kind: Literal["checkpoint", "model", "base"]  # how MODEL_REF resolved (modelref.ResolvedRef.kind)
    registry: RegistryRef | None
    manifest_sha256: str | None = None  # of the checkpoint's lmctl.json: which exact model was measured
    data: DataFingerprint
    method: EvalMethod
    perplexity: float
    metrics: dict[str, float]
    sums: dict[str, float | int]
    seconds: float
    created_at: str
    documents: list[dict[str, float | int]] | None = None
    baseline: BaselineSummary | None = None
    comparison: Comparison | None = None
    suites: list[SuiteResult] = []
    latency: LatencyReport | None = None
    lm_eval: dict[str, dict[str, object]] | None = None
    gates: list[Gate] = []

    @property
    def identity(self) -> ModelIdentity:
        return ModelIdentity(model=self.model, registry=self.registry, manifest_sha256=self.manifest_sha256)


class LoadedReport(BaseModel):
    """A report read from disk, with what the audit history records of the file."""

    report: EvalReport
    path: str  # absolute
    sha256: str

    def record(self) -> dict[str, str]:
        return {"path": self.path, "sha256": self.sha256}


def load_eval_report(path: Path) -> LoadedReport:
    """Read and validate a report written by `lmctl eval --report`; DataError (exit 2) otherwise."""
    try:
        raw = path.read_bytes()
        data = json.loads(raw)
    except (OSError, ValueError) as exc:
        raise DataError(f"eval report {path} cannot be read: {exc}") from None
    if not isinstance(data, dict) or data.get("schema_version") != REPORT_SCHEMA:
        raise DataError(f"{path} is not an lmctl eval report (schema {REPORT_SCHEMA})",
                        hint="write one with `lmctl eval ... --report FILE`")
    try:
        report = EvalReport.model_validate(data)
    except ValidationError as exc:
        raise DataError(f"eval report {path} is malformed: {str(exc).splitlines()[0]}") from None
    return LoadedReport(report=report, path=str(path.resolve()), sha256=hashlib.sha256(raw).hexdigest())
