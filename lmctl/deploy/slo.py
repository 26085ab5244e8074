"""The service level objectives `lmctl deploy` writes Prometheus alerting rules for (`--slo FILE`).

Only pydantic here, read by the CLI at start-up like `options`. The defaults are what a new
deployment gets without `--slo`: 99.5% of completions without a server error over 30 days,
p95 latency 1 s, p99 2.5 s, p95 time to first token 0.5 s. The burn-rate windows are the
multi-window, multi-burn-rate alerts of the Google SRE workbook ("Alerting on SLOs", table 5-8:
2% of a 30-day budget in 1 h (5 m short window) pages, 5% in 6 h (30 m) pages, 10% in 3 d (6 h)
is a ticket), plus the 10%-in-1-day (2 h) ticket row that Sloth and Pyrra add between them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lmctl.errors import BadInputError

# Prometheus' duration syntax (units in this order, each at most once), e.g. 5m, 1h30m, 30d
_DURATION = re.compile(r"^((\d+)y)?((\d+)w)?((\d+)d)?((\d+)h)?((\d+)m)?((\d+)s)?((\d+)ms)?$")
_UNIT_S = {"y": 365 * 86400, "w": 7 * 86400, "d": 86400, "h": 3600, "m": 60, "s": 1, "ms": 0.001}
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def duration_seconds(text: str) -> float:
    """Seconds in a Prometheus duration; ValueError for anything Prometheus would refuse."""
    if not text or not _DURATION.match(text) or text.isdigit():
        raise ValueError(f"{text!r} is not a Prometheus duration (e.g. 30s, 5m, 1h, 30d)")
    return sum(int(n) * _UNIT_S[u] for n, u in re.findall(r"(\d+)(ms|[ywdhms])", text))


def _duration(text: str) -> str:
    if duration_seconds(text) <= 0:
        raise ValueError(f"{text!r}: a window must be longer than 0")
    return text


class BurnWindow(BaseModel):
    """One multi-window burn-rate alert: it fires while the error ratio over both windows is above
    burn rate x the error budget, where burn rate = budget_consumed x period / long_window."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    long_window: str = Field(description="Window whose error ratio must be high (Prometheus duration, e.g. 1h).")
    short_window: str = Field(description="Window that must be high too, so the alert stops soon after the errors "
                              "stop (the workbook uses 1/12 of the long window).")
    budget_consumed: float = Field(gt=0, le=1, description="Share of the period's error budget spent within "
                                   "long_window that triggers the alert (0-1).")
    severity: Literal["page", "ticket"] = Field(description="page: wake someone up; ticket: handle in working hours.")

    _long = field_validator("long_window")(_duration)
    _short = field_validator("short_window")(_duration)

    @model_validator(mode="after")
    def _short_is_shorter(self) -> "BurnWindow":
        if duration_seconds(self.short_window) >= duration_seconds(self.long_window):
            raise ValueError(f"short_window {self.short_window} must be shorter than long_window {self.long_window}")
        return self


WORKBOOK_WINDOWS = (
    BurnWindow(long_window="1h", short_window="5m", budget_consumed=0.02, severity="page"),     # 14.4x
    BurnWindow(long_window="6h", short_window="30m", budget_consumed=0.05, severity="page"),    # 6x
    BurnWindow(long_window="1d", short_window="2h", budget_consumed=0.10, severity="ticket"),   # 3x
    BurnWindow(long_window="3d", short_window="6h", budget_consumed=0.10, severity="ticket"),   # 1x
)


class SloConfig(BaseModel):
    """Objectives and alert settings of one deployment (`lmctl deploy --slo FILE`, YAML)."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    availability: float = Field(0.995, gt=0, lt=1, description="Share of completion requests answered without a "
                                "server error over `period` (0.995: 0.5% error budget).")
    period: str = Field("30d", description="SLO period the error budget is counted over (Prometheus duration).")
    error_status: str = Field("5..", description="Regex over the `status` label of lmctl_requests_total counted as "
                              "errors: server errors only by default (a 4xx is the client's; 429 is a refusal the "
                              "client is told to retry).")
    endpoints: list[str] = Field(["completions", "chat.completions"], min_length=1,
                                 description="`endpoint` label values the availability and latency SLOs cover.")
    burn_windows: list[BurnWindow] = Field(list(WORKBOOK_WINDOWS), min_length=1, description="Multi-window "
                                           "burn-rate alerts (default: the SRE workbook's, for a 30-day period).")
    latency_p95_s: float = Field(1.0, gt=0, description="p95 request latency objective (seconds, arrival to last "
                                 "byte, non-streaming and streaming alike).")
    latency_p99_s: float = Field(2.5, gt=0, description="p99 request latency objective (seconds).")
    ttft_p95_s: float = Field(0.5, gt=0, description="p95 time-to-first-token objective (seconds).")
    latency_window: str = Field("5m", description="Window the latency quantiles are computed over.")
    latency_for: str = Field("10m", description="How long a quantile must stay over its objective before it alerts.")
    event_window: str = Field("15m", description="Window in which one canary rollback, reload refusal or spent "
                              "quota raises its alert.")
    model: str | None = Field(None, description="Served model name (the `model` label) the rules watch; default: "
                              "the name the deployed server reports.")
    alert_labels: dict[str, str] = Field({}, description="Extra labels on every alert (e.g. team: ml), for routing.")
    rule_labels: dict[str, str] = Field({}, description="kubernetes: labels on the PrometheusRule object, for the "
                                        "Prometheus' ruleSelector (kube-prometheus-stack: release: RELEASE).")
    runbook_url: str | None = Field(None, description="Base URL of your runbook; each alert gets "
                                    "runbook_url = this + '#' + the alert name in lowercase.")

    _windows = field_validator("period", "latency_window", "latency_for", "event_window")(_duration)

    @field_validator("alert_labels", "rule_labels")
    @classmethod
    def _label_names(cls, labels: dict[str, str]) -> dict[str, str]:
        bad = [name for name in labels if not _LABEL_NAME.match(name)]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a Prometheus label name")
        return labels

    @field_validator("error_status")
    @classmethod
    def _regex(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"{pattern!r} is not a regex: {exc}") from None
        return pattern

    @model_validator(mode="after")
    def _windows_fit_period(self) -> "SloConfig":
        period = duration_seconds(self.period)
        longs = [w.long_window for w in self.burn_windows]
        if len(set(longs)) != len(longs):
            raise ValueError(f"burn windows share a long_window ({', '.join(longs)}): each names its alert")
        for window in self.burn_windows:
            if duration_seconds(window.long_window) > period:
                raise ValueError(f"burn window {window.long_window} is longer than the period {self.period}")
        return self

    def burn_rate(self, window: BurnWindow) -> float:
        """How many times faster than 'exactly spent by the end of the period' the budget burns."""
        return window.budget_consumed * duration_seconds(self.period) / duration_seconds(window.long_window)


def load_slo(path: Path | None) -> SloConfig:
    """`--slo FILE` as a SloConfig (the defaults without one); exit 2 naming the field on bad input."""
    import yaml

    if path is None:
        return SloConfig()
    if not path.is_file():
        raise BadInputError(f"--slo {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        return SloConfig.model_validate(data)
    except yaml.YAMLError as exc:
        raise BadInputError(f"--slo {path}: not YAML: {exc}") from None
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'file'}: {str(e['msg']).removeprefix('Value error, ')}"
                             for e in exc.errors())
        raise BadInputError(f"--slo {path}: {problems}") from None
