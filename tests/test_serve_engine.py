"""The batching engine against the real tiny Llama (and a really trained LoRA adapter).

The reference for every greedy output is transformers' own `model.generate(do_sample=False)`
run one prompt at a time without padding; the engine must match it token for token while
batching prompts of different lengths, admitting newcomers mid-decode and dropping rows.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lmctl.serve.engine import Engine, EngineStoppedError, QueueFullError, SamplingParams
from serve_support import log_records

TEXTS = ["hello", "the quick brown fox jumps over the lazy dog", "a b", "data science is fun and useful",
         "lorem ipsum dolor sit amet, consectetur adipiscing elit", "x"]


@pytest.fixture(scope="module")
def base(tiny_base: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_base).eval(), AutoTokenizer.from_pretrained(tiny_base)


@pytest.fixture
def engine(base: tuple[Any, Any]) -> Iterator[Engine]:
    eng = Engine(*base, max_batch_size=4, batch_wait_ms=2)
    eng.start()
    yield eng
    eng.stop(drain=False, timeout=10)


def prompts(tok: Any) -> list[list[int]]:
    return [tok(t)["input_ids"] for t in TEXTS]


def reference(model: Any, tok: Any, ids: list[int], max_tokens: int) -> list[int]:
    import torch

    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_tokens, do_sample=False, eos_token_id=None,
                             pad_token_id=tok.pad_token_id)
    return out[0, len(ids):].tolist()


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0)


def check_greedy_matches_generate(model: Any, tok: Any) -> None:
    # Different lengths and budgets with 3 rows max: rows finish at different steps and waiting
    # jobs join a batch mid-decode, so padding, merging and row dropping are all exercised.
    eng = Engine(model, tok, max_batch_size=3, batch_wait_ms=0)
    budgets = [5, 17, 9, 23, 3, 12]
    jobs = [eng.submit(ids, greedy(n)) for ids, n in zip(prompts(tok), budgets)]
    eng.start()
    try:
        got = [job.wait(60) for job in jobs]
    finally:
        eng.stop()
    for ids, n, completion in zip(prompts(tok), budgets, got):
        assert completion.token_ids == reference(model, tok, ids, n)
        assert completion.finish_reason == "length" and completion.prompt_tokens == len(ids)
    assert eng.peak_batch == 3


def test_greedy_batched_equals_generate_one_at_a_time(base: tuple[Any, Any]) -> None:
    check_greedy_matches_generate(*base)


def test_greedy_with_trained_adapter_equals_generate(trained_checkpoint: Path) -> None:
    from peft import PeftModel

    from lmctl.loading import load_for_inference
    from lmctl.modelref import resolve

    loaded = load_for_inference(resolve(str(trained_checkpoint)), dtype="float32")
    assert isinstance(loaded.model, PeftModel)
    check_greedy_matches_generate(loaded.model, loaded.tokenizer)


def test_jobs_waiting_together_run_as_one_batch(base: tuple[Any, Any]) -> None:
    model, tok = base
    eng = Engine(model, tok, max_batch_size=8, draft_tokens=0)
    jobs = [eng.submit(ids, greedy(10)) for ids in prompts(tok)[:4]]
    assert eng.queue_depth == 4 and eng.running == 0
    eng.start()
    assert all(len(job.wait(30).token_ids) == 10 for job in jobs)
    eng.stop()
    # one prefill + 9 decode steps for all four, not 4 x 10 forward passes
    assert eng.forward_passes == 10 and eng.peak_batch == 4


def run_staggered(model: Any, tok: Any) -> tuple[list[list[int]], int]:
    """Four jobs, two rows at most, all queued before start: C and D join while B (then C) still
    decode, at steps fixed by the budgets. Returns the outputs and the engine's forward passes."""
    eng = Engine(model, tok, max_batch_size=2, batch_wait_ms=0, draft_tokens=0)
    jobs = [eng.submit(ids, greedy(n)) for ids, n in zip(prompts(tok)[1:5], [3, 6, 4, 2])]
    eng.start()
    try:
        return [job.wait(60).token_ids for job in jobs], eng.forward_passes
    finally:
        eng.stop()


def test_newcomers_prefill_inside_the_decode_step(base: tuple[Any, Any]) -> None:
    """With the engine's own attention (sdpa models) a newcomer's prompt rides in the running
    rows' decode forward (lmctl.serve.ragged): A+B prefill, then 7 steps for 15 tokens in all,
    with C and D joining mid-decode, where a prefill pass of their own made it 9 passes."""
    model, tok = base
    assert Engine(model, tok)._ragged
    outputs, passes = run_staggered(model, tok)
    for ids, n, got in zip(prompts(tok)[1:5], [3, 6, 4, 2], outputs):
        assert got == reference(model, tok, ids, n)
    assert passes == 8


@pytest.mark.parametrize("wrong_last_guess", [False, True])
def test_draft_tokens_save_forwards_and_never_change_outputs(base: tuple[Any, Any], wrong_last_guess: bool,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Prompts that repeat themselves (so prompt lookup has something to propose) beside others,
    greedy and sampled rows mixed: every greedy output is still generate()'s, token for token,
    and the sampled row keeps its seed's output. The tiny model loops, so its drafts are all
    accepted; with the last token of every draft made wrong, rejected drafts (masked columns
    in the cache, positions that advance by what was kept) must change nothing either."""
    from lmctl.serve.drafts import NgramDrafter

    model, tok = base
    if wrong_last_guess:
        honest = NgramDrafter.propose
        monkeypatch.setattr(NgramDrafter, "propose", lambda self, limit: [
            *(guess := honest(self, limit))[:-1], *[(t + 1) % len(tok) for t in guess[-1:]]])
    loop = tok("the cat sat on the mat and the cat sat on the mat and the cat")["input_ids"]
    texts, budgets = [loop, loop[3:], prompts(tok)[1], prompts(tok)[3]], [40, 33, 25, 30]
    eng = Engine(model, tok, max_batch_size=3, batch_wait_ms=0, draft_tokens=4)
    jobs = [eng.submit(ids, greedy(n)) for ids, n in zip(texts, budgets)]
    seeded = SamplingParams(max_tokens=20, temperature=0.8, seed=7)
    sampled = eng.submit(prompts(tok)[0], seeded)
    eng.start()
    try:
        got = [job.wait(60).token_ids for job in jobs]
        drawn = sampled.wait(60).token_ids
    finally:
        eng.stop()
    for ids, n, out in zip(texts, budgets, got):
        assert out == reference(model, tok, ids, n)
    assert eng.accepted > 0 and eng.forward_passes < sum(budgets)  # 128 greedy tokens, fewer forwards
    assert (eng.drafted > eng.accepted) == wrong_last_guess
    alone = Engine(model, tok, draft_tokens=0)
    alone.start()
    try:
        assert alone.submit(prompts(tok)[0], seeded).wait(60).token_ids == drawn
    finally:
        alone.stop()


def test_models_on_other_attention_prefill_in_a_pass_of_their_own(tiny_base: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_base, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(tiny_base)
    assert not Engine(model, tok)._ragged
    outputs, passes = run_staggered(model, tok)
    for ids, n, got in zip(prompts(tok)[1:5], [3, 6, 4, 2], outputs):
        assert got == reference(model, tok, ids, n)
    assert passes == 9


def test_seeded_sampling_is_reproducible_whatever_else_is_batched(engine: Engine, base: tuple[Any, Any]) -> None:
    _, tok = base
    ids = prompts(tok)[1]
    params = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.9, seed=1234)
    alone = engine.submit(ids, params).wait(30).token_ids
    others = [engine.submit(p, SamplingParams(max_tokens=30, temperature=1.2)) for p in prompts(tok)]
    crowded = engine.submit(ids, params)
    assert crowded.wait(30).token_ids == alone
    assert all(job.wait(30).finish_reason == "length" for job in others)
    reseeded = [engine.submit(ids, SamplingParams(max_tokens=24, temperature=0.9, seed=s)).wait(30).token_ids
                for s in (1, 2, 3)]
    assert any(r != alone for r in reseeded)  # the seed really drives the draw


def test_top_p_tiny_keeps_only_the_most_likely_token(engine: Engine, base: tuple[Any, Any]) -> None:
    model, tok = base
    ids = prompts(tok)[3]
    sampled = engine.submit(ids, SamplingParams(max_tokens=12, temperature=1.5, top_p=1e-6, seed=5)).wait(30)
    assert sampled.token_ids == reference(model, tok, ids, 12)


def test_stop_token_ends_the_job_and_is_not_returned(engine: Engine, base: tuple[Any, Any]) -> None:
    _, tok = base
    ids = prompts(tok)[0]

    def run(stop: set[int]) -> Any:  # seeded sampling: varied tokens, the same on every run
        params = SamplingParams(max_tokens=20, temperature=1.0, seed=3, stop_token_ids=frozenset(stop))
        return engine.submit(ids, params).wait(30)

    full = run(set())
    assert full.finish_reason == "length" and len(full.token_ids) == 20
    cut = next(k for k in range(1, 20) if full.token_ids[k] not in full.token_ids[:k])
    stopped = run({full.token_ids[cut]})
    assert stopped.finish_reason == "stop" and stopped.token_ids == full.token_ids[:cut]
    first = run({full.token_ids[0]})
    assert first.token_ids == [] and first.finish_reason == "stop" and first.ttft_s is None


def test_cancel_running_and_waiting_jobs(base: tuple[Any, Any]) -> None:
    model, tok = base
    eng = Engine(model, tok, max_batch_size=1)
    running = eng.submit(prompts(tok)[0], SamplingParams(max_tokens=240, temperature=0))
    waiting = eng.submit(prompts(tok)[1], greedy(5))
    waiting.cancel()
    assert waiting.wait(1).finish_reason == "cancelled" and eng.queue_depth == 1  # only `running` waits
    eng.start()

    async def consume() -> list[int]:
        seen = []
        async for token in running.stream():
            seen.append(token)
            if len(seen) == 3:
                running.cancel()
        return seen

    seen = asyncio.run(consume())
    result = running.wait(10)
    assert result.finish_reason == "cancelled"
    assert 3 <= len(result.token_ids) < 240 and result.token_ids == seen
    eng.stop()


def test_no_forward_runs_once_the_last_row_is_cancelled(base: tuple[Any, Any]) -> None:
    """A stop string ends a request by cancelling its job between two steps. When that was the
    only row, the next step has nothing to run: it used to run a forward over zero rows, which
    failed and logged "decode step failed" with a traceback."""
    import time

    model, tok = base
    eng = Engine(model, tok, max_batch_size=1)
    eng.start()
    with log_records("lmctl") as records:
        try:
            job = eng.submit(prompts(tok)[0], SamplingParams(max_tokens=240, temperature=0))
            while job.first_token is None:
                time.sleep(0.001)
            with eng._cv:  # the worker ends the step it is in and waits here, between two steps
                passes = -1
                while passes != eng.forward_passes:  # settled: no step starts while the lock is held
                    passes = eng.forward_passes
                    time.sleep(0.2)
                assert not job.done
                job.cancel()
            result = job.wait(10)
            time.sleep(0.2)  # the worker's next turn, where the empty step used to run
        finally:
            eng.stop()
    assert result.finish_reason == "cancelled" and len(result.token_ids) >= 1
    assert eng.forward_passes == passes and eng.running == 0
    assert [r.getMessage() for r in records] == []


def test_queue_full_and_stopped_engine_refuse_new_jobs(base: tuple[Any, Any]) -> None:
    model, tok = base
    eng = Engine(model, tok, max_queue=2)
    first, second = (eng.submit(p, greedy(4)) for p in prompts(tok)[:2])
    with pytest.raises(QueueFullError):
        eng.submit(prompts(tok)[2], greedy(4))
    eng.start()
    assert first.wait(30).finish_reason == second.wait(30).finish_reason == "length"
    eng.stop()
    with pytest.raises(EngineStoppedError):
        eng.submit(prompts(tok)[0], greedy(4))


def test_stop_drain_finishes_queued_and_running_jobs(base: tuple[Any, Any]) -> None:
    model, tok = base
    eng = Engine(model, tok, max_batch_size=2)
    eng.start()
    jobs = [eng.submit(p, greedy(15)) for p in prompts(tok)]
    eng.stop(drain=True, timeout=60)
    assert [job.wait(0).finish_reason for job in jobs] == ["length"] * len(jobs)
    assert all(len(job.wait(0).token_ids) == 15 for job in jobs)


def test_stop_without_drain_cancels(base: tuple[Any, Any]) -> None:
    model, tok = base
    eng = Engine(model, tok, max_batch_size=1)
    eng.start()
    jobs = [eng.submit(p, SamplingParams(max_tokens=200, temperature=0)) for p in prompts(tok)[:3]]
    eng.stop(drain=False, timeout=30)
    reasons = [job.wait(0).finish_reason for job in jobs]
    assert reasons[1:] == ["cancelled", "cancelled"] and reasons[0] in ("cancelled", "length")


def test_streaming_yields_the_same_tokens_as_result(engine: Engine, base: tuple[Any, Any]) -> None:
    _, tok = base

    async def run() -> None:
        jobs = [engine.submit(p, SamplingParams(max_tokens=16, temperature=0.7, seed=i))
                for i, p in enumerate(prompts(tok))]

        async def collect(job: Any) -> list[int]:
            return [t async for t in job.stream()]

        streamed = await asyncio.gather(*(collect(j) for j in jobs))
        results = await asyncio.gather(*(j.result() for j in jobs))
        for tokens, result in zip(streamed, results):
            assert tokens == result.token_ids and len(tokens) == 16
            assert result.ttft_s is not None and 0 <= result.queued_s <= result.ttft_s <= result.total_s

    asyncio.run(run())


def test_fifty_concurrent_jobs_from_threads_and_asyncio_all_complete(base: tuple[Any, Any]) -> None:
    model, tok = base
    eng = Engine(model, tok, max_batch_size=8, max_queue=64)
    eng.start()
    ids = prompts(tok)  # tokenized once: a fast tokenizer is not meant to be shared by threads
    expected = {i: reference(model, tok, p, 8) for i, p in enumerate(ids)}
    results: dict[str, list[int]] = {}
    lock = threading.Lock()

    def client(n: int) -> None:
        k = n % len(TEXTS)
        out = eng.submit(ids[k], greedy(8)).wait(60)
        with lock:
            results[f"t{n}"] = out.token_ids
        assert out.token_ids == expected[k]

    async def aclients() -> None:
        async def one(n: int) -> None:
            k = n % len(TEXTS)
            out = await eng.submit(ids[k], greedy(8)).result()
            results[f"a{n}"] = out.token_ids
            assert out.token_ids == expected[k]

        await asyncio.gather(*(one(n) for n in range(25)))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(25)]
    for t in threads:
        t.start()
    asyncio.run(aclients())
    for t in threads:
        t.join(60)
    eng.stop()
    assert len(results) == 50
    assert all(results[f"{w}{n}"] == expected[n % len(TEXTS)] for w in "ta" for n in range(25))
    assert eng.peak_batch > 1


def test_bad_requests_are_refused_before_queueing(base: tuple[Any, Any]) -> None:
    model, tok = base
    eng = Engine(model, tok)
    with pytest.raises(ValueError, match="no tokens"):
        eng.submit([], greedy(4))
    with pytest.raises(ValueError, match="token ids"):
        eng.submit([len(tok) + 10_000], greedy(4))
    with pytest.raises(ValueError, match="positions"):
        eng.submit([1] * 250, greedy(10))
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    assert eng.queue_depth == 0


def test_default_limits_are_the_cpu_cap_and_a_kv_budget(base: tuple[Any, Any]) -> None:
    from lmctl.serve.kvcache import CPU_BATCH_CAP, auto_batch_limits

    rows, tokens = auto_batch_limits(base[0])
    assert rows == CPU_BATCH_CAP
    assert tokens > CPU_BATCH_CAP * 256  # the tiny model's KV cache is a few KB per token


def test_rows_join_only_while_their_kv_cache_fits_the_budget(base: tuple[Any, Any]) -> None:
    """Budget 60 tokens: two rows of 10 + 20 (padded: 2 x 30) fit, a third does not; a lone
    request bigger than the budget still runs (alone), and everything completes."""
    model, tok = base
    eng = Engine(model, tok, max_batch_size=8, batch_wait_ms=0, kv_budget_tokens=60)
    small = [eng.submit([5] * 10, greedy(20)) for _ in range(4)]
    big = eng.submit([5] * 10, greedy(70))
    eng.start()
    try:
        assert all(len(job.wait(60).token_ids) == 20 for job in small)
        assert len(big.wait(60).token_ids) == 70
    finally:
        eng.stop()
    assert eng.peak_batch == 2
