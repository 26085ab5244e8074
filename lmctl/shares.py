"""The steps of a gradual rollout, as `lmctl serve --canary-steps` and `lmctl deploy --canary-steps` read them.

One parser for both: the server climbs these shares itself, the Kubernetes target renders one
HTTPRoute per share, and both must agree on what a valid list is.
"""

from __future__ import annotations


def parse_steps(value: object) -> list[float]:
    """Comma-separated (or listed) shares of traffic, strictly rising in (0, 1] and ending at 1.0; ValueError else."""
    if isinstance(value, str):
        try:
            value = [float(part) for part in value.split(",") if part.strip()]
        except ValueError:
            raise ValueError(f"{value!r}: expected comma-separated shares such as 0.05,0.25,0.5,1.0") from None
    steps = [float(s) for s in value] if isinstance(value, (list, tuple)) else []
    if not steps or any(not 0 < s <= 1 for s in steps) or steps != sorted(set(steps)) or steps[-1] != 1.0:
        shown = ",".join(f"{s:g}" for s in steps) or repr(value)
        raise ValueError(f"{shown}: steps must be strictly rising shares in (0, 1] ending at 1.0")
    return steps
