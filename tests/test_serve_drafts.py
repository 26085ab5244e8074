"""Prompt-lookup drafts (lmctl.serve.drafts): what they propose, on token lists."""

from __future__ import annotations

from lmctl.serve.drafts import NgramDrafter


def test_the_tokens_after_the_latest_earlier_trigram_are_proposed() -> None:
    drafter = NgramDrafter([5, 1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 4, 1, 2, 3])
    assert drafter.propose(2) == [7, 8]  # the later of the two earlier [1, 2, 3], not the first
    assert drafter.propose(0) == []


def test_a_bigram_is_the_fallback_and_no_match_proposes_nothing() -> None:
    drafter = NgramDrafter([4, 6, 1, 2, 8, 3, 1, 2])
    assert drafter.propose(3) == [8, 3, 1]
    assert NgramDrafter([1, 2, 3, 4]).propose(3) == []
    assert NgramDrafter([7]).propose(3) == []


def test_a_loop_is_copied_on_past_the_end_of_the_context() -> None:
    drafter = NgramDrafter([9, 1, 2, 1, 2, 1, 2])
    assert drafter.propose(5) == [1, 2, 1, 2, 1]


def test_emitted_tokens_extend_the_index() -> None:
    drafter = NgramDrafter([1, 2, 3])
    assert drafter.propose(2) == []
    drafter.extend([4, 1, 2, 3])
    assert drafter.propose(2) == [4, 1]
    assert drafter.context == [1, 2, 3, 4, 1, 2, 3]
