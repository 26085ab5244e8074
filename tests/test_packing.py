"""Packing: rows hold whole examples, nothing is predicted or attended across examples."""

from __future__ import annotations

from pathlib import Path

import torch

from lmctl.data.examples import IGNORE
from lmctl.data.packing import collate_packed, pack, packing_is_isolated
from lmctl.loading import load_base_model


def _examples(lengths: list[int]) -> list[dict[str, list[int]]]:
    out, next_id = [], 10
    for n in lengths:
        ids = list(range(next_id, next_id + n))
        next_id += n
        out.append({"input_ids": ids, "labels": ids})
    return out


def test_pack_keeps_every_example_whole_and_rows_short() -> None:
    examples = _examples([30, 5, 17, 64, 2, 40, 9, 33, 60, 4])
    rows = pack(examples, max_length=64)
    assert all(len(r["input_ids"]) <= 64 for r in rows)
    assert sorted(t for r in rows for t in r["input_ids"]) == sorted(t for e in examples for t in e["input_ids"])
    assert len(rows) == 5  # 264 tokens in rows of 64: best-fit decreasing needs only one more than the minimum
    for row in rows:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        for start in starts:  # each example's first token is never a label
            assert row["labels"][start] == IGNORE


def test_collate_pads_as_its_own_block() -> None:
    rows = pack(_examples([5, 3, 6]), max_length=8)
    batch = collate_packed(rows, pad_id=0)
    assert "attention_mask" not in batch
    widths = [len(r["input_ids"]) for r in rows]
    for i, n in enumerate(widths):
        assert batch["position_ids"][i, n:].tolist() == list(range(max(widths) - n))
        assert (batch["labels"][i, n:] == IGNORE).all()


def test_tiny_llama_isolates_packed_examples(tiny_base: Path) -> None:
    model = load_base_model(str(tiny_base)).eval()
    model.config.use_cache = False
    assert packing_is_isolated(model, model.config.vocab_size)


def test_packed_loss_equals_separate_losses(tiny_base: Path) -> None:
    model = load_base_model(str(tiny_base)).eval()
    model.config.use_cache = False
    examples = _examples([9, 6, 12])
    rows = pack(examples, max_length=32)
    assert len(rows) == 1
    with torch.no_grad():
        packed = model(**collate_packed(rows, pad_id=0)).loss
        # reference: each example alone, loss summed over its own predicted tokens
        total, count = 0.0, 0
        for ex in examples:
            ids = torch.tensor([ex["input_ids"]])
            total += float(model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    assert abs(float(packed) - total / count) < 1e-5


def test_training_with_and_without_packing(cli, tiny_config: Path) -> None:
    packed = cli("train", tiny_config, "--dry-run", "--json").json
    padded = cli("train", tiny_config, "--set", "data.packing=false", "--dry-run", "--json").json
    assert packed["packing"] and packed["train_sequences"] < padded["train_sequences"] == padded["train_examples"]
    result = cli("train", tiny_config, "--set", "train.max_steps=2", "--set", "train.save_every=2", "--json")
    assert result.code == 0, result.err
