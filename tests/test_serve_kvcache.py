"""The engine's KV cache layer and grouped-query attention against transformers' own.

The references are transformers' `DynamicLayer` (concatenation per step) for the cache and
its `sdpa` attention for `use_gqa_attention`; greedy engine outputs are compared with
`model.generate` one prompt at a time, as in test_serve_engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from lmctl.serve.engine import Engine, SamplingParams
from lmctl.serve.kvcache import GQA_ATTENTION, GrowingCache, GrowingLayer, use_gqa_attention
from test_serve_engine import prompts, reference


def kv(rows: int, columns: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 2, columns, 4, generator=g), torch.randn(rows, 2, columns, 4, generator=g)


def test_appends_past_the_initial_buffer_like_dynamic_layer() -> None:
    mine, theirs = GrowingLayer(), DynamicLayer()
    buffers = set()
    for step, width in enumerate([5, *[1] * 40]):  # a prefill, then 40 decode steps: several doublings
        k, v = kv(3, width, step)
        got, want = mine.update(k, v), theirs.update(k, v)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        buffers.add(mine._k.data_ptr())
    assert mine.get_seq_length() == theirs.get_seq_length() == 45
    assert mine.get_mask_sizes(1) == theirs.get_mask_sizes(1)
    # doubling: a handful of buffers for 41 updates, not one per step
    assert 2 <= len(buffers) <= 4 and mine._k.shape[-2] >= 45


def test_squeeze_drops_trailing_holes_and_packs_each_rows_live_columns_to_the_right() -> None:
    """Rejected draft tokens leave masked columns: trailing ones are forgotten at once; holes
    between live columns are squeezed out once they widen the cache past the longest row."""
    from lmctl.serve.batch import Batch, squeeze_columns

    cache = GrowingCache()
    k, v = kv(2, 40, 3)
    cache.update(k, v, 0)
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[0, 2:36:2] = 0  # 17 holes in row 0
    mask[1, :20] = 0  # left padding of row 1
    mask[:, 37:] = 0  # the last 3 columns are holes in both rows
    batch = squeeze_columns(Batch(jobs=[], cache=cache, mask=mask.clone(), last=None, pos=None))
    assert batch is not None
    live = [mask[r].nonzero().flatten() for r in range(2)]  # 20 and 17 live columns
    assert batch.mask.shape == (2, 20) and batch.mask.sum(dim=-1).tolist() == [20, 17]
    assert batch.mask[1, :3].sum() == 0 and batch.mask[1, 3:].all()
    layer = cache.layers[0]
    for r in range(2):
        assert torch.equal(layer.keys[r, :, 20 - len(live[r]):], k[r][:, live[r]])
        assert torch.equal(layer.values[r, :, 20 - len(live[r]):], v[r][:, live[r]])
    k2, v2 = kv(2, 1, 4)  # and the next step appends after the packed columns
    keys, _ = cache.update(k2, v2, 0)
    assert keys.shape[-2] == 21 and torch.equal(keys[:, :, -1:], k2)


def test_select_drop_and_append_rows_match_concatenation() -> None:
    layer, ref = GrowingLayer(), DynamicLayer()
    k, v = kv(4, 6, 0)
    layer.update(k, v)
    ref.update(k, v)
    index = torch.tensor([0, 2, 3])
    layer.batch_select_indices(index)
    ref.batch_select_indices(index)
    layer.drop_leading(2)
    assert torch.equal(layer.keys, ref.keys[..., 2:, :]) and torch.equal(layer.values, ref.values[..., 2:, :])
    # rows of a wider cache join below: the narrower side is left-padded with zeros
    other = GrowingLayer()
    k2, v2 = kv(2, 7, 1)
    other.update(k2, v2)
    layer.append_rows(other)
    pad = torch.zeros(3, 2, 3, 4)
    assert torch.equal(layer.keys, torch.cat([torch.cat([pad, ref.keys[..., 2:, :]], dim=-2), k2]))
    assert torch.equal(layer.values, torch.cat([torch.cat([pad, ref.values[..., 2:, :]], dim=-2), v2]))
    k3, v3 = kv(5, 1, 2)  # the merged cache keeps appending in place of a concatenation
    keys, values = layer.update(k3, v3)
    assert keys.shape == (5, 2, 8, 4) and torch.equal(keys[..., -1:, :], k3) and torch.equal(values[..., -1:, :], v3)


def test_gqa_attention_gives_the_same_logits_as_sdpa(tiny_base: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    sdpa = AutoModelForCausalLM.from_pretrained(tiny_base, attn_implementation="sdpa").eval()
    gqa = AutoModelForCausalLM.from_pretrained(tiny_base, attn_implementation="sdpa").eval()
    assert sdpa.config.num_key_value_heads < sdpa.config.num_attention_heads  # grouped-query, or this proves nothing
    assert use_gqa_attention(gqa) and gqa.config._attn_implementation == GQA_ATTENTION
    batch = tok(["hello", "the quick brown fox jumps"], padding=True, return_tensors="pt")
    assert not bool(batch["attention_mask"].all())  # padded: the masked path the engine always takes
    with torch.inference_mode():
        want = sdpa(**batch, past_key_values=GrowingCache(), use_cache=True).logits
        got = gqa(**batch, past_key_values=GrowingCache(), use_cache=True).logits
    assert torch.equal(got, want)
    eager = AutoModelForCausalLM.from_pretrained(tiny_base, attn_implementation="eager")
    assert not use_gqa_attention(eager) and eager.config._attn_implementation == "eager"


@pytest.fixture(scope="module")
def model_tok(tiny_base: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_base).eval(), AutoTokenizer.from_pretrained(tiny_base)


@pytest.mark.parametrize("max_batch", [1, 2, 6])
def test_greedy_outputs_do_not_depend_on_batch_composition(model_tok: tuple[Any, Any], max_batch: int) -> None:
    """Alone, in pairs (rows leave and newcomers take their place) or all together, past the
    first buffer (60 new tokens): the same tokens as generate."""
    model, tok = model_tok
    budgets = [60, 7, 33, 2, 45, 12]
    eng = Engine(model, tok, max_batch_size=max_batch, batch_wait_ms=0)
    jobs = [eng.submit(ids, SamplingParams(max_tokens=n, temperature=0)) for ids, n in zip(prompts(tok), budgets)]
    eng.start()
    try:
        got = [job.wait(120).token_ids for job in jobs]
    finally:
        eng.stop()
    assert eng.peak_batch == max_batch
    for ids, n, tokens in zip(prompts(tok), budgets, got):
        assert tokens == reference(model, tok, ids, n)
