"""`lmctl serve MODEL_REF`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmctl.cli.output import TracebackOpt

_LIMITS = "Limits"
_CANARY = "Canary and reload"


def serve(
    model_ref: Annotated[str, typer.Argument(metavar="MODEL_REF", help="Checkpoint dir, model dir or models:/ reference (an @ALIAS is followed as it moves).")],
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.")] = 8000,
    api_keys_file: Annotated[Path | None, typer.Option("--api-keys-file", help="File with one API key per line (else LMCTL_API_KEYS).")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Allow a non-loopback address without API keys.")] = False,
    served_model_name: Annotated[str | None, typer.Option(help="Model id clients see (default: registry or directory name).")] = None,
    max_batch_size: Annotated[int, typer.Option(help="Most requests generated together.", rich_help_panel=_LIMITS)] = 8,
    max_queue: Annotated[int, typer.Option(help="Requests that may wait; more get 429.", rich_help_panel=_LIMITS)] = 64,
    max_input_tokens: Annotated[int | None, typer.Option(help="Longest prompt in tokens (default: the model context).", rich_help_panel=_LIMITS)] = None,
    max_tokens_cap: Annotated[int, typer.Option(help="Upper bound on a request's max_tokens.", rich_help_panel=_LIMITS)] = 512,
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body (413 above).", rich_help_panel=_LIMITS)] = 1 << 20,
    request_timeout: Annotated[float, typer.Option(help="Seconds before a request gets 504.", rich_help_panel=_LIMITS)] = 120.0,
    sample_log: Annotated[Path | None, typer.Option(help="JSONL sample of requests, PII redacted (input of lmctl drift).")] = None,
    sample_rate: Annotated[float, typer.Option(help="Share of requests sampled into --sample-log (0-1).")] = 0.0,
    canary: Annotated[str | None, typer.Option(help="MODEL_REF that receives --canary-weight of traffic.", rich_help_panel=_CANARY)] = None,
    canary_weight: Annotated[float, typer.Option(help="Share of traffic for the canary (0-1).", rich_help_panel=_CANARY)] = 0.1,
    canary_window: Annotated[float, typer.Option(help="Seconds of traffic the canary is judged over.", rich_help_panel=_CANARY)] = 60.0,
    canary_min_requests: Annotated[int, typer.Option(help="Canary requests needed before judging.", rich_help_panel=_CANARY)] = 20,
    canary_max_error_margin: Annotated[float, typer.Option(help="Roll back when canary error rate exceeds baseline by this (0-1).", rich_help_panel=_CANARY)] = 0.05,
    canary_max_p95_margin: Annotated[float, typer.Option(help="Roll back when canary p95 exceeds baseline by this percent.", rich_help_panel=_CANARY)] = 50.0,
    reload_interval: Annotated[float, typer.Option(help="Seconds between alias re-resolutions.", rich_help_panel=_CANARY)] = 30.0,
    json_out: Annotated[bool, typer.Option("--json", help="Accepted for uniformity; the server logs to stderr.")] = False,
    traceback: TracebackOpt = False,
) -> None:
    """Serve an OpenAI-compatible API (completions, chat, streaming) after verifying the checkpoint lock."""
    from pydantic import ValidationError

    from lmctl.errors import BadInputError
    from lmctl.serve import serve as run_server
    from lmctl.serve.settings import CanaryPolicy, ServeSettings

    try:
        settings = ServeSettings(
            host=host, port=port, api_keys_file=api_keys_file, insecure=insecure, served_model_name=served_model_name,
            max_batch_size=max_batch_size, max_queue=max_queue, max_input_tokens=max_input_tokens,
            max_tokens_cap=max_tokens_cap, max_body_bytes=max_body_bytes, request_timeout_s=request_timeout,
            sample_log=sample_log, sample_rate=sample_rate, canary=canary, canary_weight=canary_weight,
            canary_policy=CanaryPolicy(window_s=canary_window, min_requests=canary_min_requests,
                                       max_error_rate_margin=canary_max_error_margin, max_p95_margin_pct=canary_max_p95_margin),
            reload_interval_s=reload_interval,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "options"
        raise BadInputError(f"{where}: {first['msg']}") from None
    run_server(model_ref, settings)
