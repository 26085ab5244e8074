"""`lmctl serve`: an OpenAI-compatible server over verified registry versions.

Modules: `settings` (every option, typed), `slots` (a loaded version + its batching
`engine`), `canary` (traffic split and automatic rollback), `reload` (following a
models:/NAME@ALIAS), `handlers` (one request: limits, generation, bookkeeping), `app`
(routes, request ids), `keys` (the keys file, hashed secrets), `quota` (per-key rate limits
and token budgets in SQLite), `access` (auth, admission and usage by key name), `guard` (the
output guard: PII and deny-listed patterns in generated text), `metrics`
(Prometheus), `sample_log` (the PII-redacted request sample that `lmctl drift` reads).

Models are resolved, verified and loaded before the port is bound, so a tampered checkpoint
never serves a request: `lmctl serve` exits 4 instead. This package's __init__ imports
nothing heavy; FastAPI, torch and transformers load only when a server starts.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import TYPE_CHECKING, Any

from lmctl.errors import BadInputError
from lmctl.serve.settings import ServeSettings

if TYPE_CHECKING:
    from lmctl.serve.keys import Keyring

log = logging.getLogger("lmctl.serve")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_app(ref: str, settings: ServeSettings, api_keys: list[str] | Keyring) -> Any:
    """Load the primary (and canary) version, then assemble the app; nothing is bound yet.
    `api_keys`: the keyring, or plain keys (each unlimited)."""
    from lmctl.home import lmctl_home
    from lmctl.serve.access import Access
    from lmctl.serve.app import create_app
    from lmctl.serve.canary import Router
    from lmctl.serve.guard import OutputGuard
    from lmctl.serve.handlers import Context
    from lmctl.serve.keys import Keyring
    from lmctl.serve.metrics import ServeMetrics
    from lmctl.serve.reload import AliasFollower
    from lmctl.serve.sample_log import SampleLog
    from lmctl.serve.slots import load_slot

    from lmctl.serve import rollout as gradual, shadow as mirror

    sample_log = SampleLog(settings.sample_log, settings.sample_rate) if settings.sample_log else None
    primary = load_slot(ref, "primary", settings, model_name=settings.served_model_name)
    loaded = [primary]
    try:
        for role, other in (("canary", settings.canary), ("shadow", settings.shadow)):
            if other and not (role == "shadow" and other == settings.canary):
                loaded.append(load_slot(other, role, settings, model_name=primary.model_name))
    except BaseException:
        for slot in loaded:
            slot.engine.stop(drain=False)
        raise
    canary = next((s for s in loaded if s.role == "canary"), None)
    own_shadow = next((s for s in loaded if s.role == "shadow"), None)
    holder: dict[str, Any] = {}
    metrics = ServeMetrics(lambda: holder["router"].slots() if holder else [])

    def rolled_back(event: dict[str, Any]) -> None:
        metrics.canary_rollbacks.labels(event["model"], event["canary_version"]).inc()
        router = holder["router"]
        if router.canary is not None:
            router.canary.retire()
        if holder.get("rollout") is not None:
            holder["rollout"].rolled_back(event)

    router = Router(primary, canary, settings.canary_weight, settings.canary_policy, on_rollback=rolled_back)
    router.extra_slots = [own_shadow] if own_shadow is not None else []
    holder["router"] = router
    shadow = mirror.attach(router, metrics.registry, settings, own_shadow)
    holder["rollout"] = gradual.attach(router, settings, ref, shadow)
    refs = {"primary": ref, **({"canary": settings.canary} if settings.canary else {})}
    follower = AliasFollower(router, settings, refs, metrics)
    keyring = api_keys if isinstance(api_keys, Keyring) else Keyring.from_secrets(api_keys)
    quota_db = (settings.quota_db or lmctl_home() / "serve" / "quota.sqlite") if keyring.limited else None
    access = Access(keyring, metrics, quota_db, settings.cost_per_1k_tokens)
    guard = OutputGuard(settings.output_guard, settings.output_deny, metrics.guard_events)
    ctx = Context(router, settings, metrics, sample_log, access, guard, shadow=shadow)
    app = create_app(ctx, follower)
    app.state.lmctl = ctx  # what an embedding process (a test, a benchmark) may inspect
    return app


def serve(ref: str, settings: ServeSettings) -> None:
    """Check options, verify and load `ref`, then serve until interrupted (SIGINT/SIGTERM drain)."""
    import uvicorn

    from lmctl.serve.keys import load_keyring

    keys = load_keyring(settings.api_keys_file)
    if not keys and not is_loopback(settings.host) and not settings.insecure:
        raise BadInputError(f"refusing to serve on {settings.host} without API keys",
                            hint="set LMCTL_API_KEYS or --api-keys-file, or pass --insecure")
    app = build_app(ref, settings, keys)
    log.info("serving %s on http://%s:%d", ref, settings.host, settings.port)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning",
                timeout_graceful_shutdown=int(settings.request_timeout_s))
