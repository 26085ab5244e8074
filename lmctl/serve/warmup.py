"""The warm-up generation that gates readiness: a cold pod gets no traffic.

The first forward passes of a freshly loaded model are slow (kernel selection and compilation,
lazily allocated buffers, the allocator's first growth, pages of the weights still on their way
from disk). `lmctl serve` therefore runs a short greedy generation through each served version's
real engine before `/readyz` answers 200; a load balancer or Kubernetes readiness probe sends
nothing before that. The time it took is logged and shown on `/healthz`.

Readiness waits on the primary version: if it cannot generate, the server stays not ready. A
canary is warmed too, but a canary that fails is left to the canary policy, which rolls it back
on its first errors (lmctl.serve.canary): it must not take the stable version out of traffic.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

log = logging.getLogger("lmctl.serve")
PROMPT = "Hello"
# A cold model's first steps can take long (a large model paging its weights in); the request
# timeout is for clients, not for this: past this many seconds the server stays not ready.
TIMEOUT_S = 600.0


def _generate(slot: Any, tokens: int, timeout_s: float) -> int:
    """Greedy `tokens` tokens of PROMPT through the slot's engine (blocking); the tokens generated."""
    from lmctl.serve.engine import SamplingParams

    ids = list(slot.tokenizer(PROMPT)["input_ids"]) or [slot.tokenizer.eos_token_id or 0]
    # no stop tokens: the whole length runs, so decode steps are warmed, not just the prefill
    job = slot.engine.submit(ids, SamplingParams(max_tokens=tokens, temperature=0.0))
    return len(job.wait(timeout_s).token_ids)


def warm_slot(slot: Any, tokens: int) -> None:
    """Warm one version before it takes traffic (a hot reload's new version), blocking; raises
    whatever the generation raised. `tokens` 0: nothing."""
    if tokens:
        t0 = time.perf_counter()
        _generate(slot, tokens, TIMEOUT_S)
        log.info("warm-up of version %s: %d greedy token(s) in %.3f s", slot.version, tokens, time.perf_counter() - t0)


async def warm_up(slots: list[Any], tokens: int, timeout_s: float = TIMEOUT_S) -> dict[str, Any]:
    """Warm every slot in turn, off the event loop (health checks keep answering meanwhile).
    Returns what /healthz shows; raises whatever the primary's generation raised."""
    started = time.perf_counter()
    per_version: dict[str, dict[str, Any]] = {}
    for slot in slots:
        t0 = time.perf_counter()
        try:
            generated = await asyncio.to_thread(_generate, slot, tokens, timeout_s)
        except Exception as exc:
            if slot.role == "primary":
                raise
            log.warning("warm-up of canary version %s failed: %s: %s", slot.version, type(exc).__name__, exc)
            per_version[slot.version] = {"role": slot.role, "error": f"{type(exc).__name__}: {exc}"}
            continue
        per_version[slot.version] = {"role": slot.role, "tokens": generated,
                                     "seconds": round(time.perf_counter() - t0, 4)}
    seconds = round(time.perf_counter() - started, 4)
    log.info("warm-up: %d greedy token(s) per version in %.3f s (%s); ready", tokens, seconds,
             ", ".join(f"version {v}: {w['seconds']:.3f} s" if "seconds" in w else f"version {v}: failed"
                       for v, w in per_version.items()))
    return {"status": "done", "tokens": tokens, "seconds": seconds, "versions": per_version}
