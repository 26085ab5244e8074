"""Perplexity windows score every token exactly once and agree with a plain full-sequence loss."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from lmctl.evaluate.perplexity import MIN_LENGTH_SHARE, Window, _batches, make_windows, perplexity


@pytest.mark.parametrize(("n", "max_length", "stride"), [(1, 4, 2), (10, 4, 2), (10, 4, 4), (9, 8, 3), (100, 16, 1)])
def test_windows_score_each_token_once_with_bounded_context(n: int, max_length: int, stride: int) -> None:
    ids = list(range(100, 100 + n))
    scored: list[int] = []
    for w in make_windows(0, ids, prefix=1, max_length=max_length, stride=stride):
        assert 1 <= len(w.input_ids) <= max_length
        # the window's inputs are exactly the tokens before each target
        assert w.input_ids[w.score_from :] == ([1] + ids)[len(scored) : len(scored) + len(w.targets)]
        scored.extend(w.targets)
    assert scored == ids


def test_batches_bound_padding_and_keep_every_window() -> None:
    lengths = [1024, 259, 1024, 1000, 950, 30, 31, 1024, 12, 1]
    windows = [Window(i, [0] * n, 0, [0]) for i, n in enumerate(lengths)]
    batches = list(_batches(iter(windows), 3))
    assert sorted(w.doc for b in batches for w in b) == list(range(len(lengths)))
    for batch in batches:
        longest = len(batch[0].input_ids)
        assert 1 <= len(batch) <= 3
        assert all(MIN_LENGTH_SHARE * longest <= len(w.input_ids) <= longest for w in batch)
    # the 259-token window is never padded to 1024, as a plain sort-and-chunk would
    assert [len(w.input_ids) for w in next(b for b in batches if b[0].doc == 1)] == [259]


def _reference_nll(model, ids: list[int], prefix: int) -> float:  # type: ignore[no-untyped-def]
    import torch

    x = torch.tensor([[prefix] + ids])
    with torch.inference_mode():
        logits = model(input_ids=x).logits[0, :-1].float()
    return -float(torch.log_softmax(logits, -1).gather(1, torch.tensor(ids)[:, None]).sum())


def test_matches_full_sequence_loss_and_ignores_padding(tiny_base: Path) -> None:
    from lmctl.loading import load_base_model, load_tokenizer

    tok = load_tokenizer(str(tiny_base))
    model = load_base_model(str(tiny_base)).eval()
    long = "A tokenizer hashes each token twice. The server serves one request."
    texts = ["The model reads the adapter quickly.", long, long + "!"]
    encoded = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    expected = sum(_reference_nll(model, ids, tok.bos_token_id) for ids in encoded)
    # Window covers each document whole; the two long ones (within 10% of each other) are
    # batched together, the shorter one padded; the short document gets a batch of its own.
    windows = [w for i, ids in enumerate(encoded) for w in make_windows(i, ids, tok.bos_token_id, 128, 128)]
    assert [[w.doc for w in b] for b in _batches(iter(windows), 2)] == [[2, 1], [0]]
    scored = perplexity(model, tok, texts, max_length=128, stride=128, batch_size=2)
    sums = scored.sums
    assert scored.doc_tokens == [len(ids) for ids in encoded]
    assert sums.tokens == sum(map(len, encoded))
    assert math.isclose(sums.nll_sum, expected, rel_tol=1e-5)
    assert math.isclose(sums.metrics["perplexity"], math.exp(expected / sums.tokens), rel_tol=1e-5)
    assert math.isclose(sums.metrics["bits_per_byte"], expected / (sums.bytes * math.log(2)), rel_tol=1e-5)
    # batch size must not change the result (padding is never scored)
    single = perplexity(model, tok, texts, max_length=128, stride=128, batch_size=1).sums
    assert math.isclose(single.nll_sum, sums.nll_sum, rel_tol=1e-5)
    # short windows give each token less context: a different, still finite number
    short = perplexity(model, tok, texts, max_length=4, stride=2, batch_size=3).sums
    assert short.tokens == sums.tokens and math.isfinite(short.nll_sum)


def test_per_document_sums_add_up(cli, tiny_base: Path) -> None:
    data = Path(__file__).parent / "assets" / "tiny_validation.jsonl"
    result = cli("eval", tiny_base, "--data", data, "--max-length", "32", "--per-document", "--json")
    assert result.code == 0, result.err
    report = result.json
    docs = report["documents"]
    assert [d["index"] for d in docs] == list(range(8))
    assert sum(d["tokens"] for d in docs) == report["sums"]["tokens"]
    assert math.isclose(sum(d["nll_sum"] for d in docs), report["sums"]["nll_sum"], rel_tol=1e-9)
    assert report["method"]["stride"] == 16  # strided default: half the window


def test_head_at_scored_positions_equals_full_logits_and_streams(tiny_base: Path) -> None:
    """The body + head-on-scored-rows path gives the full forward's numbers; texts may be a
    one-shot generator (windows are built as documents stream by), and the auto batch size
    comes from the memory budget."""
    from lmctl.evaluate import perplexity as ppl
    from lmctl.loading import load_base_model, load_tokenizer

    tok = load_tokenizer(str(tiny_base))
    model = load_base_model(str(tiny_base)).eval()
    texts = [f"Document {i}: the adapter reads {'tokens ' * (i % 7)}and the server answers." for i in range(70)]
    assert ppl._head_only_at_scored(model) is not None
    fast = ppl.perplexity(model, tok, (t for t in texts), max_length=16, stride=8, batch_size=5)
    assert fast.sums.documents == len(texts) and len(fast.doc_nll) == len(texts)  # > one tokenize chunk
    original = ppl._head_only_at_scored
    try:
        ppl._head_only_at_scored = lambda m: None  # type: ignore[assignment]  # the full-logits path
        full = ppl.perplexity(model, tok, texts, max_length=16, stride=8, batch_size=3)
    finally:
        ppl._head_only_at_scored = original  # type: ignore[assignment]
    assert fast.doc_tokens == full.doc_tokens
    for a, b in zip(fast.doc_nll, full.doc_nll):
        assert math.isclose(a, b, rel_tol=1e-5)
    assert ppl.auto_batch_size(model, 16, budget_bytes=1) == 1
    assert ppl.auto_batch_size(model, 1024, budget_bytes=64 << 20) < ppl.auto_batch_size(model, 128, budget_bytes=64 << 20)
