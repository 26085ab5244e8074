"""Everything `lmctl serve` can be told, as one typed object with help on every field.

The CLI builds it from flags; tests build it directly. Validation happens here, before any
model is loaded or port bound, so a bad flag costs nothing.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lmctl.shares import parse_steps


class CanaryPolicy(BaseModel):
    """When the canary is judged broken. Margins are over the baseline's value in the same window."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    window_s: float = Field(60.0, gt=0, description="Sliding window (seconds) over which error rate and p95 are compared.")
    min_requests: int = Field(20, ge=1, description="Canary requests needed in the window before it can be judged.")
    max_error_rate_margin: float = Field(
        0.05, ge=0, le=1, description="Roll back when canary error rate exceeds the baseline's by more than this (0-1).")
    max_p95_margin_pct: float = Field(
        50.0, ge=0, description="Roll back when canary p95 latency exceeds the baseline's by more than this percent.")


class KeyLimits(BaseModel):
    """A key's limits; None is unlimited."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    requests_per_minute: int | None = Field(None, ge=1, description="Requests a minute (a bucket refilled evenly).")
    tokens_per_minute: int | None = Field(None, ge=1, description="Tokens a minute: prompt + max_tokens reserved at "
                                          "admission, settled to the real count after.")
    tokens_per_day: int | None = Field(None, ge=1, description="Tokens a UTC day; spent, the key gets "
                                       "insufficient_quota until midnight UTC.")
class RolloutPolicy(BaseModel):
    """A gradual rollout of the canary: its share of traffic climbs step by step while it stays healthy."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    steps: list[float] | None = Field(
        None, description="Canary shares of traffic, rising, ending at 1.0 (e.g. 0.05,0.25,0.5,1.0); reaching and "
        "holding 1.0 promotes a models:/ canary in the registry. Default: no rollout, a fixed --canary-weight.")
    step_min_s: float = Field(300.0, gt=0, description="Seconds each step must last before the canary may advance.")
    step_min_requests: int = Field(
        100, ge=1, description="Canary requests each step must serve (and be judged healthy on) before it may advance.")
    min_agreement: float | None = Field(
        None, ge=0, le=1, description="Roll back when the shadow's greedy agreement with the primary falls below this "
        "(0-1); needs --shadow set to the canary's reference.")

    @field_validator("steps", mode="before")
    @classmethod
    def _parse_steps(cls, value: object) -> object:
        return None if value is None else parse_steps(value)


class ServeSettings(BaseModel):
    """Options of one `lmctl serve` process."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    host: str = Field("127.0.0.1", description="Address to bind; non-loopback needs API keys or --insecure.")
    port: int = Field(8000, ge=0, le=65535, description="Port to bind (0 picks a free one).")
    served_model_name: str | None = Field(None, description="Model id clients see; default: the registry name or directory name.")
    insecure: bool = Field(False, description="Allow a non-loopback address with no API key configured.")
    api_keys_file: Path | None = Field(
        None, description="API keys: a YAML keys file (names, sha256 of each secret, per-key limits; `lmctl keys add` "
        "writes it) or one key per line; else LMCTL_API_KEYS (comma-separated).")
    quota_db: Path | None = Field(
        None, description="SQLite file of the keys' rate-limit and budget counters, shared by every server process "
        "using it and kept across restarts (default: LMCTL_HOME/serve/quota.sqlite).")
    cost_per_1k_tokens: float = Field(
        0.0, ge=0, description="Cost of 1000 tokens (prompt + completion), for the lmctl_cost_total metric by API key.")
    max_batch_size: int | None = Field(
        None, ge=1, le=256, description="Most requests generated together in one batch (default: 64 on CPU, 256 on "
        "a GPU). Whatever it is, a request joins only while the batch's KV cache, counted at every row's prompt + "
        "max_tokens, fits half the free GPU memory or a quarter of the available RAM.")
    draft_tokens: int = Field(
        3, ge=0, le=16, description="Prompt-lookup draft tokens per greedy request per decode step, verified by the "
        "model in the same forward (the output is greedy decoding's); used while at most 4 requests (32 on a GPU) "
        "run, where it raises throughput and cuts latency on text that repeats itself. 0 turns drafting off.")
    max_queue: int = Field(64, ge=1, description="Requests that may wait for a batch slot; more get 429.")
    batch_wait_ms: float = Field(5.0, ge=0, description="How long the batcher waits for more requests to fill a batch.")
    max_input_tokens: int | None = Field(None, ge=1, description="Longest prompt accepted (tokens); default: the model context; prompt + max_tokens must fit it too.")
    max_tokens_cap: int = Field(512, ge=1, description="Upper bound on a request's max_tokens.")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Largest request body accepted (413 above).")
    request_timeout_s: float = Field(120.0, gt=0, description="Seconds a request may take; after that it gets 504 and its generation is cancelled.")
    sample_log: Path | None = Field(None, description="JSONL file for the privacy-safe request sample (PII redacted); input to `lmctl drift`.")
    sample_rate: float = Field(0.0, ge=0, le=1, description="Share of requests written to the sample log.")
    canary: str | None = Field(None, description="MODEL_REF served to a share of traffic.")
    canary_weight: float = Field(0.1, ge=0, le=1, description="Share of traffic routed to the canary (0-1).")
    canary_policy: CanaryPolicy = Field(default_factory=CanaryPolicy, description="Automatic canary rollback margins.")
    rollout: RolloutPolicy = Field(default_factory=RolloutPolicy, description="Gradual rollout of the canary.")
    shadow: str | None = Field(
        None, description="MODEL_REF sent a copy of sampled requests after the primary answered; clients never "
        "wait for it or see its output. Use the canary's reference to share its loaded model.")
    shadow_rate: float = Field(1.0, ge=0, le=1, description="Share of primary requests copied to the shadow (0-1).")
    shadow_max_in_flight: int = Field(
        4, ge=1, description="Most shadow copies waiting or running at once; past it a copy is skipped (and counted). "
        "Copies run only while the primary has no request running or waiting, so the shadow takes spare capacity.")
    warmup_tokens: int = Field(4, ge=0, le=64, description="Greedy tokens each served version generates at start-up "
                               "before /readyz answers 200, so a cold server gets no traffic (0: ready at once).")
    reload_interval_s: float = Field(30.0, gt=0, description="Seconds between re-resolutions of a models:/NAME@ALIAS reference (hot reload).")
    output_guard: Literal["off", "flag", "redact", "refuse"] = Field(
        "flag", description="What the output guard does with personal data (the `lmctl data` detector) or a "
        "--output-deny match in generated text, streams included: off, flag (count and log the kind), redact "
        "(replace it before it is sent), refuse (end the response there, finish_reason content_filter).")
    output_deny: list[str] = Field(
        default_factory=list, description="A regular expression (Python syntax) the output guard treats as a "
        "finding of kind deny; repeat the flag for several.")

    @field_validator("output_deny")
    @classmethod
    def _patterns_compile(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a regular expression: {exc}") from None
        return patterns

    @model_validator(mode="after")
    def _sample_log_needs_rate(self) -> "ServeSettings":
        if self.sample_rate > 0 and self.sample_log is None:
            raise ValueError("sample_rate > 0 needs sample_log")
        return self

    @model_validator(mode="after")
    def _rollout_needs_canary(self) -> "ServeSettings":
        if self.rollout.steps is not None and self.canary is None:
            raise ValueError("--canary-steps needs --canary MODEL_REF")
        if self.rollout.min_agreement is not None and self.shadow is None:
            raise ValueError("--canary-min-agreement needs --shadow (the canary's reference)")
        return self
