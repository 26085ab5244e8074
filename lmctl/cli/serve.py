"""`lmctl serve MODEL_REF`: flags, defaults and help come from ServeSettings / CanaryPolicy."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmctl.cli.fields import option, options_from
from lmctl.cli.output import TracebackOpt
from lmctl.serve.settings import CanaryPolicy, RolloutPolicy, ServeSettings

_LIMITS = "Limits"
_CANARY = "Canary and reload"
_ROLLOUT = "Shadow and gradual rollout"
S, C, R = ServeSettings, CanaryPolicy, RolloutPolicy
# flags whose name is not the field's
_FLAGS = {"request_timeout_s": "--request-timeout", "reload_interval_s": "--reload-interval",
          "canary_policy.window_s": "--canary-window", "canary_policy.min_requests": "--canary-min-requests",
          "canary_policy.max_error_rate_margin": "--canary-max-error-margin",
          "canary_policy.max_p95_margin_pct": "--canary-max-p95-margin", "rollout.steps": "--canary-steps",
          "rollout.step_min_s": "--canary-step-min-duration", "rollout.step_min_requests": "--canary-step-min-requests",
          "rollout.min_agreement": "--canary-min-agreement"}


def serve(
    model_ref: Annotated[str, typer.Argument(metavar="MODEL_REF", help="Checkpoint dir, model dir or models:/ reference (an @ALIAS is followed as it moves).")],
    host: str = option(S, "host"),
    port: int = option(S, "port"),
    api_keys_file: Path | None = option(S, "api_keys_file", "--api-keys-file"),
    quota_db: Path | None = option(S, "quota_db", "--quota-db"),
    cost_per_1k_tokens: float = option(S, "cost_per_1k_tokens", "--cost-per-1k-tokens"),
    insecure: bool = option(S, "insecure", "--insecure"),
    served_model_name: str | None = option(S, "served_model_name"),
    max_batch_size: int | None = option(S, "max_batch_size", rich_help_panel=_LIMITS),
    draft_tokens: int = option(S, "draft_tokens", rich_help_panel=_LIMITS),
    max_queue: int = option(S, "max_queue", rich_help_panel=_LIMITS),
    max_input_tokens: int | None = option(S, "max_input_tokens", rich_help_panel=_LIMITS),
    max_tokens_cap: int = option(S, "max_tokens_cap", rich_help_panel=_LIMITS),
    max_body_bytes: int = option(S, "max_body_bytes", rich_help_panel=_LIMITS),
    request_timeout: float = option(S, "request_timeout_s", "--request-timeout", rich_help_panel=_LIMITS),
    warmup_tokens: int = option(S, "warmup_tokens", "--warmup-tokens", rich_help_panel=_LIMITS),
    sample_log: Path | None = option(S, "sample_log"),
    sample_rate: float = option(S, "sample_rate"),
    canary: str | None = option(S, "canary", rich_help_panel=_CANARY),
    canary_weight: float = option(S, "canary_weight", rich_help_panel=_CANARY),
    canary_window: float = option(C, "window_s", "--canary-window", rich_help_panel=_CANARY),
    canary_min_requests: int = option(C, "min_requests", "--canary-min-requests", rich_help_panel=_CANARY),
    canary_max_error_margin: float = option(C, "max_error_rate_margin", "--canary-max-error-margin", rich_help_panel=_CANARY),
    canary_max_p95_margin: float = option(C, "max_p95_margin_pct", "--canary-max-p95-margin", rich_help_panel=_CANARY),
    reload_interval: float = option(S, "reload_interval_s", "--reload-interval", rich_help_panel=_CANARY),
    output_guard: str = option(S, "output_guard", "--output-guard"),
    output_deny: list[str] = option(S, "output_deny", "--output-deny", metavar="REGEX"),
    canary_steps: str | None = option(R, "steps", "--canary-steps", metavar="SHARES", rich_help_panel=_ROLLOUT),
    canary_step_min_duration: float = option(R, "step_min_s", "--canary-step-min-duration", rich_help_panel=_ROLLOUT),
    canary_step_min_requests: int = option(R, "step_min_requests", "--canary-step-min-requests", rich_help_panel=_ROLLOUT),
    canary_min_agreement: float | None = option(R, "min_agreement", "--canary-min-agreement", rich_help_panel=_ROLLOUT),
    shadow: str | None = option(S, "shadow", rich_help_panel=_ROLLOUT),
    shadow_rate: float = option(S, "shadow_rate", rich_help_panel=_ROLLOUT),
    shadow_max_in_flight: int = option(S, "shadow_max_in_flight", rich_help_panel=_ROLLOUT),
    json_out: Annotated[bool, typer.Option("--json", help="Accepted for uniformity; the server logs to stderr.")] = False,
    traceback: TracebackOpt = False,
) -> None:
    """Serve an OpenAI-compatible API (completions, chat, streaming) after verifying the checkpoint lock."""
    from lmctl.serve import serve as run_server

    settings = options_from(ServeSettings, {
        "host": host, "port": port, "api_keys_file": api_keys_file, "quota_db": quota_db,
        "cost_per_1k_tokens": cost_per_1k_tokens, "insecure": insecure,
        "served_model_name": served_model_name, "max_batch_size": max_batch_size, "draft_tokens": draft_tokens,
        "max_queue": max_queue,
        "max_input_tokens": max_input_tokens, "max_tokens_cap": max_tokens_cap, "max_body_bytes": max_body_bytes,
        "request_timeout_s": request_timeout, "warmup_tokens": warmup_tokens, "sample_log": sample_log,
        "sample_rate": sample_rate,
        "canary": canary, "canary_weight": canary_weight, "reload_interval_s": reload_interval,
        "output_guard": output_guard, "output_deny": output_deny or [],
        "canary_policy": {"window_s": canary_window, "min_requests": canary_min_requests,
                          "max_error_rate_margin": canary_max_error_margin, "max_p95_margin_pct": canary_max_p95_margin},
        "rollout": {"steps": canary_steps, "step_min_s": canary_step_min_duration,
                    "step_min_requests": canary_step_min_requests, "min_agreement": canary_min_agreement},
        "shadow": shadow, "shadow_rate": shadow_rate, "shadow_max_in_flight": shadow_max_in_flight,
    }, _FLAGS)
    run_server(model_ref, settings)
