"""`lmctl registry diff REF_A REF_B`: what differs between two checkpoints or versions.

Both are resolved and verified; the comparison covers the resolved config (flattened to
section.key), base model, data fingerprints, tokenizer (fingerprint, special tokens, vocab
size, chat template) and, for registry versions, the `eval.*` metric tags.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from lmctl import checkpoint


class Change(BaseModel):
    key: str
    a: Any
    b: Any


class DiffResult(BaseModel):
    a: str
    b: str
    identical: bool
    config: list[Change]
    base_model: list[Change]
    data: list[Change]
    tokenizer: list[Change]
    metrics: list[Change]


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(_flatten(inner, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def _changes(a: dict[str, Any], b: dict[str, Any]) -> list[Change]:
    a, b = _flatten(a), _flatten(b)
    return [Change(key=k, a=a.get(k), b=b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _side(ref: str) -> tuple[checkpoint.Manifest, dict[str, Any]]:
    from lmctl import versions
    from lmctl.modelref import resolve_checkpoint

    verified = resolve_checkpoint(ref, "diff compares checkpoints or registry versions")
    metrics: dict[str, Any] = {}
    if verified.registry_name and verified.registry_version:
        tags = versions.get_version(verified.registry_name, verified.registry_version).tags
        metrics = {k.removeprefix("eval."): float(v) for k, v in tags.items() if k.startswith("eval.")}
    return verified.manifest, metrics


def diff(ref_a: str, ref_b: str) -> DiffResult:
    (ma, metrics_a), (mb, metrics_b) = _side(ref_a), _side(ref_b)
    tok_a, tok_b = ma.tokenizer.model_dump(exclude={"files"}), mb.tokenizer.model_dump(exclude={"files"})
    parts = {
        "config": _changes(ma.config.model_dump(mode="json"), mb.config.model_dump(mode="json")),
        "base_model": _changes(ma.base_model.model_dump(), mb.base_model.model_dump()),
        "data": _changes(ma.data.model_dump(mode="json"), mb.data.model_dump(mode="json")),
        "tokenizer": _changes(tok_a, tok_b),
        "metrics": _changes(metrics_a, metrics_b),
    }
    return DiffResult(a=ref_a, b=ref_b, identical=not any(parts.values()), **parts)
