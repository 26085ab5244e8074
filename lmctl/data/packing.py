"""Padding-free packing: several short examples share one row of at most max_length tokens.

Rows are filled best-fit-decreasing from the example lengths alone (numpy arrays); a row's
tokens are read from the memory-mapped Arrow table only when the Trainer asks for it. Position ids restart at 0 for every example, and
transformers' masking utilities (attention_mask=None + position_ids) turn those restarts
into a block-diagonal causal mask, so no example attends to another. The first label of
each example is masked, so no token is predicted across an example boundary. Padding at
the end of a row is its own block (positions restart, labels masked), so it needs no
attention mask either. `packing_is_isolated` checks on the real model that this holds
before training relies on it.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import numpy as np

from lmctl.data.examples import IGNORE


def pack_plan(lengths: np.ndarray, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit decreasing over example lengths: each example goes to the fullest row it still
    fits in (ties: the oldest row). Returns (example indices in row order, row start offsets).

    Rows are grouped by free space (at most max_length distinct values), so finding the best
    row is a bisect over those values and a heap pop, not a scan over every open row.
    """
    import heapq

    by_space: dict[int, list[int]] = {}  # free space -> heap of row indices with that much room
    spaces: list[int] = []  # the free-space values that have rows, sorted
    rows: list[list[int]] = []
    for ex in np.argsort(-lengths, kind="stable").tolist():
        n = int(lengths[ex])
        i = bisect.bisect_left(spaces, n)
        if i < len(spaces):
            space = spaces[i]
            row = heapq.heappop(by_space[space])
            if not by_space[space]:
                del by_space[space], spaces[i]
        else:
            space, row = max_length, len(rows)
            rows.append([])
        rows[row].append(ex)
        if space - n > 1:  # a gap of one token cannot hold an example worth learning
            if space - n not in by_space:
                by_space[space - n] = []
                bisect.insort(spaces, space - n)
            heapq.heappush(by_space[space - n], row)
    order = np.fromiter((ex for row in rows for ex in row), dtype=np.int64, count=len(lengths))
    starts = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=starts[1:])
    return order, starts


def packed_row(examples: Sequence[dict[str, list[int]]]) -> dict[str, list[int]]:
    """One row of whole examples: positions restart at 0 and each example's first label is masked."""
    row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for ex in examples:
        row["input_ids"] += ex["input_ids"]
        row["labels"] += [IGNORE] + list(ex["labels"][1:])
        row["position_ids"] += list(range(len(ex["input_ids"])))
    return row


class Rows:
    """The sequences training reads, built on demand from an ExampleSet: packed rows when a
    plan is given, else one example per row. A map-style dataset for the Trainer's DataLoader."""

    def __init__(self, examples: Sequence[dict[str, list[int]]], plan: tuple[np.ndarray, np.ndarray] | None) -> None:
        self.examples, self.plan = examples, plan

    def __len__(self) -> int:
        return len(self.plan[1]) - 1 if self.plan is not None else len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        if self.plan is None:
            return self.examples[i]
        order, starts = self.plan
        if not 0 <= i < len(self):
            raise IndexError(i)
        return packed_row([self.examples[int(j)] for j in order[starts[i] : starts[i + 1]]])

    @property
    def memory_bytes(self) -> int:
        return sum(a.nbytes for a in self.plan) if self.plan is not None else 0


def pack(examples: Sequence[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """All packed rows at once (small sets and tests; training reads them lazily through `Rows`)."""
    lengths = np.array([len(e["input_ids"]) for e in examples], dtype=np.int64)
    rows = Rows(examples, pack_plan(lengths, max_length))
    return [rows[i] for i in range(len(rows))]


def pack_batch(batch: dict[str, list[Any]], max_length: int) -> dict[str, list[Any]]:
    """Best-fit packing of one batch of a stream (IterableDataset.map(batched=True)): a stream
    cannot be sorted as a whole, so rows are filled within each batch of examples."""
    examples = [{"input_ids": i, "labels": lab} for i, lab in zip(batch["input_ids"], batch["labels"])]
    packed = pack(examples, max_length)
    return {key: [row[key] for row in packed] for key in ("input_ids", "labels", "position_ids")}


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


def packing_is_isolated(model: Any, vocab_size: int, batch: int = 1, length: int = 12) -> bool:
    """True when the model's hidden states for an example do not change when another precedes it
    in the row. Runs where the model is, on `batch` rows of `length` tokens (training's shape,
    so the attention kernel training will use is the one probed); compares the decoder's
    last hidden states, so no [tokens, vocab] logits are made. Half precision gets a looser
    tolerance: a leak moves the states by their own size, rounding by a few percent at most."""
    import torch

    length = max(length, 4)
    tail = min(16, length // 2)
    generator = torch.Generator().manual_seed(0)
    packed = torch.randint(0, vocab_size, (batch, length), generator=generator)
    positions = torch.cat([torch.arange(length - tail), torch.arange(tail)]).repeat(batch, 1)
    param = next(model.parameters())
    decoder = model.get_base_model().base_model if hasattr(model, "get_base_model") else model.base_model
    tolerance = 1e-3 if param.dtype == torch.float32 else 3e-2
    with torch.no_grad():
        alone = decoder(input_ids=packed[:, -tail:].to(param.device)).last_hidden_state.float()
        together = decoder(input_ids=packed.to(param.device),
                           position_ids=positions.to(param.device)).last_hidden_state[:, -tail:].float()
    return bool((alone - together).abs().max() <= tolerance * max(1.0, float(alone.abs().max())))
