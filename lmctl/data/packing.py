"""Padding-free packing: several short examples share one row of at most max_length tokens.

Rows are filled best-fit-decreasing. Position ids restart at 0 for every example, and
transformers' masking utilities (attention_mask=None + position_ids) turn those restarts
into a block-diagonal causal mask, so no example attends to another. The first label of
each example is masked, so no token is predicted across an example boundary. Padding at
the end of a row is its own block (positions restart, labels masked), so it needs no
attention mask either. `packing_is_isolated` checks on the real model that this holds
before training relies on it.
"""

from __future__ import annotations

import bisect
from typing import Any

from lmctl.data.examples import IGNORE


def pack(examples: list[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Best-fit decreasing: each example goes to the fullest row it still fits in."""
    rows: list[dict[str, list[int]]] = []
    free: list[tuple[int, int]] = []  # (free space, row index), kept sorted
    for ex in sorted(examples, key=lambda e: len(e["input_ids"]), reverse=True):
        n = len(ex["input_ids"])
        i = bisect.bisect_left(free, (n, -1))
        if i < len(free):
            space, row_index = free.pop(i)
        else:
            rows.append({"input_ids": [], "labels": [], "position_ids": []})
            space, row_index = max_length, len(rows) - 1
        row = rows[row_index]
        row["input_ids"] += ex["input_ids"]
        row["labels"] += [IGNORE] + ex["labels"][1:]
        row["position_ids"] += list(range(n))
        if space - n > 1:  # a gap of one token cannot hold an example worth learning
            bisect.insort(free, (space - n, row_index))
    return rows


def collate_packed(rows: list[dict[str, list[int]]], pad_id: int) -> dict[str, Any]:
    """Right-pad packed rows; the padding is a block of its own, so no attention_mask is passed."""
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.arange(width).repeat(len(rows), 1)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        ids[i, :n] = torch.tensor(row["input_ids"])
        labels[i, :n] = torch.tensor(row["labels"])
        positions[i, :n] = torch.tensor(row["position_ids"])
        positions[i, n:] = torch.arange(width - n)
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def packing_is_isolated(model: Any, vocab_size: int, tolerance: float = 1e-3) -> bool:
    """True when the model's logits for an example do not change when another precedes it in the row."""
    import torch

    generator = torch.Generator().manual_seed(0)
    first = torch.randint(0, vocab_size, (1, 7), generator=generator)
    second = torch.randint(0, vocab_size, (1, 5), generator=generator)
    packed = torch.cat([first, second], dim=1)
    positions = torch.cat([torch.arange(7), torch.arange(5)])[None]
    device = next(model.parameters()).device
    with torch.no_grad():
        alone = model(input_ids=second.to(device)).logits[0].float()
        together = model(input_ids=packed.to(device), position_ids=positions.to(device)).logits[0, 7:].float()
    return bool((alone - together).abs().max() <= tolerance * max(1.0, float(alone.abs().max())))
