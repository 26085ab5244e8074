"""Drift checks as statistical tests (issue 26): random halves of one corpus do not alarm, a
real shift does, the report carries p-values, and the correction across checks is applied.

The corpus is generated here: documents drawn from one Zipf vocabulary, each repeating a few
words of its own (as real documents repeat their names and terms), so tokens within a document
are not independent. A word-level tokenizer over that vocabulary and a tiny random Llama make
the real `lmctl drift` path (tokenizer, perplexity, checks) run in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lmctl.config import DriftConfig
from lmctl.monitor import signals
from lmctl.monitor.drift import Scored, assess
from lmctl import stats

VOCAB = 3000  # words per topic; topic 1 uses the next VOCAB words


def _word(i: int) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return letters[i % 26] + letters[(i // 26) % 26] + letters[(i // 676) % 26]


def zipf_ids(n: int, seed: int, topic: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    weights = 1 / np.arange(1, VOCAB + 1) ** 1.1
    weights /= weights.sum()
    docs = []
    for _ in range(n):
        length = int(rng.integers(80, 300))
        own = rng.choice(VOCAB, 15, p=weights)  # each document repeats a few words of its own
        ids = np.where(rng.random(length) < 0.3, rng.choice(own, length), rng.choice(VOCAB, length, p=weights))
        docs.append([int(i) + topic * VOCAB for i in ids])
    return docs


def zipf_documents(n: int, seed: int, topic: int = 0) -> list[str]:
    return [" ".join(_word(i) for i in doc) for doc in zipf_ids(n, seed, topic)]


@pytest.fixture(scope="module")
def word_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A word-level tokenizer over both topics' words and a tiny random Llama on it."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("word-model")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {_word(i): i + 3 for i in range(2 * VOCAB)}
    wl = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    wl.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=wl, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="</s>")
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def _write(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def test_random_halves_rarely_alarm_where_the_fixed_floor_alone_always_did() -> None:
    corpus = zipf_ids(60, seed=1)
    alarms, floor_only = 0, 0
    for seed in range(12):
        order = np.random.default_rng(seed).permutation(len(corpus))
        halves = [_scored_ids([corpus[i] for i in order[:30]]), _scored_ids([corpus[i] for i in order[30:]])]
        found = assess(DriftConfig(), *halves, unk_id=None)
        alarms += found.drift_detected
        floor_only += any(c.value > c.threshold for c in found.checks)
        floor_only += found.tokens.rare_rate_increase_pp > 1.0  # today's check: the raw gap over the floor
    # alpha 0.05 bounds the chance of any alarm per split: expect 0-1 of 12, never most of them
    assert alarms <= 1
    assert floor_only >= 12


def test_same_source_halves_pass_and_a_topic_shift_fails(cli, word_model: Path, tmp_path: Path) -> None:
    corpus = zipf_documents(60, seed=1)
    order = np.random.default_rng(1).permutation(len(corpus))
    ref = _write(tmp_path / "ref.jsonl", [corpus[i] for i in order[:30]])
    cur = _write(tmp_path / "cur.jsonl", [corpus[i] for i in order[30:]])
    result = cli("drift", "--model", word_model, "--reference", ref, "--current", cur, "--max-length", "512", "--json")
    assert result.code == 0, result.err
    body = result.json
    assert body["drift_detected"] is False
    assert body["significance"] == {"alpha": 0.05, "correction": "holm", "signals": 5, "permutations": 1000}
    for check in body["checks"]:
        assert 0 < check["p_value"] <= check["p_adjusted"] <= 1 and check["test"]
    rare = next(c for c in body["checks"] if c["setting"] == "drift.max_rare_rate_increase")
    assert rare["detail"]["increase_pp"] == pytest.approx(body["tokens"]["rare_rate_increase_pp"])
    assert rare["detail"]["increase_pp"] > 1.0  # the raw Good-Turing gap: over the floor, and alone it alarmed before
    shifted = _write(tmp_path / "shifted.jsonl", zipf_documents(30, seed=2, topic=1))
    result = cli("drift", "--model", word_model, "--reference", ref, "--current", shifted,
                 "--max-length", "512", "--json")
    assert result.code == 3, result.err
    rare = next(c for c in result.json["checks"] if c["setting"] == "drift.max_rare_rate_increase")
    assert not rare["passed"] and rare["significant"] and rare["p_adjusted"] <= 0.05 and rare["value"] > 50
    assert "rare token rate increase pp" in result.err


def _scored_ids(ids: list[list[int]]) -> Scored:
    return Scored(nll=[3.0 * len(doc) for doc in ids], ids=ids)


def _scored(lengths: list[int]) -> Scored:
    """Documents cycling over 5 tokens (never rare) with 3 nats per token (no perplexity change)."""
    return _scored_ids([[k % 5 for k in range(n)] for n in lengths])


def test_a_signal_significant_alone_but_not_after_correction_does_not_alarm() -> None:
    ref = _scored(list(range(100, 130)))  # 30 documents of 100..129 tokens
    cur = _scored(list(range(111, 141)))  # the same, 11 tokens longer: KS 11/30
    alone = assess(DriftConfig(correction="none", max_psi=None), ref, cur, None)
    ks = next(c for c in alone.checks if c.setting == "drift.max_ks_statistic")
    assert ks.value == pytest.approx(11 / 30, abs=1e-6) and 0.0125 < ks.p_value < 0.05  # significant alone at 0.05 ...
    assert alone.drift_detected and not ks.passed
    others = [c for c in alone.checks if c is not ks]
    assert all(c.p_value > 0.5 and c.passed for c in others)
    for correction in ("holm", "bonferroni"):  # ... not among 4 checks: 4 x p > 0.05
        corrected = assess(DriftConfig(correction=correction, max_psi=None), ref, cur, None)
        ks = next(c for c in corrected.checks if c.setting == "drift.max_ks_statistic")
        assert ks.p_adjusted == pytest.approx(min(1.0, 4 * ks.p_value)) and not ks.significant
        assert ks.passed and not corrected.drift_detected
    # significant but under its effect floor: no alarm either
    floor = assess(DriftConfig(correction="none", max_psi=None, max_ks_statistic=0.5), ref, cur, None)
    assert not floor.drift_detected


def test_holm_and_bonferroni_match_hand_computation() -> None:
    p = [0.01, 0.04, 0.03]
    # Holm: sorted 0.01, 0.03, 0.04 -> 3 x 0.01, max(0.03, 2 x 0.03), max(0.06, 1 x 0.04)
    assert signals.adjust(p, "holm") == pytest.approx([0.03, 0.06, 0.06])
    assert signals.adjust(p, "bonferroni") == pytest.approx([0.03, 0.12, 0.09])
    assert signals.adjust(p, "none") == p and signals.adjust([], "holm") == []


def test_rare_statistic_on_the_observed_split_matches_stats() -> None:
    ref, cur = [[1, 1, 2, 3], [3, 3]], [[4, 1, 2, 5], [2, 2]]
    statistic = signals.rare_rate_increase_pp(ref + cur, max_count=1)
    expected, current = stats.rare_token_rates(ref, cur, max_count=1)
    assert statistic(np.array([[0, 1]]), np.array([[2, 3]]))[0] == pytest.approx(100 * (current - expected))
    swapped_expected, swapped_current = stats.rare_token_rates(cur, ref, max_count=1)
    assert statistic(np.array([[2, 3]]), np.array([[0, 1]]))[0] == pytest.approx(
        100 * (swapped_current - swapped_expected))
