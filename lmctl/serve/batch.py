"""The engine's running rows: their jobs, KV cache, attention mask, next tokens and positions,
and the operations that keep them aligned as rows join and leave and columns empty out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmctl.serve.jobs import Job


@dataclass
class Batch:
    """Row i of every tensor (and of the cache) belongs to jobs[i]."""

    jobs: list[Job]
    cache: Any  # GrowingCache, batch x heads x mask.shape[1] x head_dim per layer
    mask: Any  # (B, L) attention mask, 0 on left padding and on rejected draft tokens
    last: Any  # (B,) last sampled token, the next decode input
    pos: Any  # (B,) position id of that token


def select_rows(batch: Batch, keep: list[int]) -> Batch | None:
    """Keep only rows `keep`, then trim the columns that are now padding in every row."""
    import torch

    if not keep:
        return None
    if len(keep) < len(batch.jobs):
        index = torch.tensor(keep, device=batch.mask.device)
        batch.cache.batch_select_indices(index)
        batch.jobs = [batch.jobs[i] for i in keep]
        batch.mask, batch.last, batch.pos = batch.mask[index], batch.last[index], batch.pos[index]
        lead = int(batch.mask.any(dim=0).int().argmax())  # first column any row attends to
        if lead > 0:
            batch.mask = batch.mask[:, lead:]
            batch.cache.drop_leading(lead)
    return batch


def merge_batches(old: Batch | None, new: Batch | None) -> Batch | None:
    """Concatenate two batches, left-padding the shorter one's mask and cache with zeros."""
    import torch
    from torch.nn.functional import pad

    if old is None or new is None:
        return new if old is None else old
    width = max(old.mask.shape[1], new.mask.shape[1])
    grow_old, grow_new = width - old.mask.shape[1], width - new.mask.shape[1]
    old.cache.append_rows(new.cache)
    old.mask = torch.cat([pad(old.mask, (grow_old, 0)), pad(new.mask, (grow_new, 0))])
    old.jobs = old.jobs + new.jobs
    old.last, old.pos = torch.cat([old.last, new.last]), torch.cat([old.pos, new.pos])
    return old


def squeeze_columns(batch: Batch | None) -> Batch | None:
    """Drop trailing columns no row attends to (rejected drafts); once masked columns between
    live ones make the cache a quarter wider than the longest row needs, gather each row's
    live columns to the right (left-padded again), so the KV memory follows the tokens."""
    import torch

    if batch is None:
        return None
    live = batch.mask.any(dim=0)
    trailing = int(live.flip(0).int().argmax())
    if trailing:
        batch.mask = batch.mask[:, :-trailing]
        batch.cache.drop_trailing(trailing)
    counts = batch.mask.sum(dim=-1)
    width = int(counts.max())
    if batch.mask.shape[1] <= width + width // 4 + 8:
        return batch
    # Stable sort puts each row's masked columns first and its live ones last, in order.
    order = torch.sort(batch.mask, dim=-1, stable=True).indices[:, -width:]
    batch.cache.keep_columns(order)
    batch.mask = (torch.arange(width, device=counts.device)[None] >= (width - counts)[:, None]).to(batch.mask.dtype)
    return batch
