"""One request's failure stays its own: a failure planted in one job's own work (its seed, its
draft, its draw, the streaming of its tokens) beside real concurrent requests, plain and streamed;
and a conversation the chat template refuses is that client's 400, not the server's 500.

The model, the batch and the neighbours are real; only the failing job is planted, through the
engine's `_seed` (where the worker sets a newcomer's generator and drafter up) or as a seed that
torch cannot take. The neighbours must finish with exactly the tokens they get with no failing
job beside them, and the failing job's client must get an error. Before the engine isolated
rows, each of these failures cancelled every job in its step.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from conftest import free_port
from lmctl.serve.drafts import NgramDrafter
from lmctl.serve.engine import Engine, Job, SamplingParams
from serve_support import LiveServer, log_records

KEY = "isolation-key-0123456789"
PLAIN, STREAMED = "the quick brown fox jumps over the lazy dog", "data science is fun and useful"
POISONED = ("lorem ipsum dolor sit amet", "hello world")  # the first joins with the neighbours, the second later


class PlantedFault(RuntimeError):
    pass


class FailingDrafter(NgramDrafter):
    """A real drafter that raises when asked for a draft ("propose"), or once it has been told
    of `after` generated tokens ("extend", which accept.stream calls after each emitted token)."""

    def __init__(self, prompt: list[int], fail_in: str, after: int = 0) -> None:
        self.fail_in, self.after, self.told = fail_in, after, -1  # -1: the prompt is not counted
        super().__init__(prompt)
        self.told = 0

    def propose(self, limit: int) -> list[int]:
        if self.fail_in == "propose":
            raise PlantedFault("planted: draft")
        return super().propose(limit)

    def extend(self, tokens: list[int]) -> None:
        super().extend(tokens)
        if self.told >= 0:
            self.told += len(tokens)
            if self.fail_in == "extend" and self.told > self.after:
                raise PlantedFault("planted: streaming a token")


def _broken_generator(job: Job) -> None:
    job.generator = object()  # torch.multinomial raises TypeError for this row's draw


FAULTS: dict[str, Callable[[Job], None]] = {
    "draft": lambda job: setattr(job, "drafter", FailingDrafter(job.prompt_ids, "propose")),
    "sample": _broken_generator,
    "stream": lambda job: setattr(job, "drafter", FailingDrafter(job.prompt_ids, "extend", after=2)),
}


def _out_of_range_seed() -> SamplingParams:
    """What a caller that skipped the schema would send: SamplingParams refuses it now, so it is
    set past that check, for the engine's own _seed to meet (torch: "Overflow when unpacking")."""
    params = SamplingParams(max_tokens=24, temperature=1.0, seed=1)
    object.__setattr__(params, "seed", 2**64)
    return params


def _poisoned_params(stage: str) -> SamplingParams:
    if stage == "seed":
        return _out_of_range_seed()
    return SamplingParams(max_tokens=24, temperature=1.0 if stage == "sample" else 0.0, seed=3)


class PlantedEngine(Engine):
    """The real engine; after its own set-up of newcomers, the planted fault goes on the jobs
    whose prompt is in `faults`."""

    def __init__(self, *args: Any, faults: dict[tuple[int, ...], Callable[[Job], None]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.faults = faults

    def _seed(self, jobs: list[Job]) -> None:
        super()._seed(jobs)
        for job in jobs:
            plant = self.faults.get(tuple(job.prompt_ids))
            if plant is not None and not job.done:
                plant(job)


@pytest.fixture(scope="module")
def tokenizer(tiny_base: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base)


@pytest.fixture(scope="module")
def models(tiny_base: Path) -> Iterator[dict[str, Any]]:
    from transformers import AutoModelForCausalLM

    yield {attn: AutoModelForCausalLM.from_pretrained(tiny_base, attn_implementation=attn).eval()
           for attn in ("sdpa", "eager")}


NEIGHBOUR_PARAMS = {PLAIN: SamplingParams(max_tokens=24, temperature=0), STREAMED: SamplingParams(max_tokens=24, temperature=0.9, seed=7)}


async def _serve(engine: Engine, tok: Any, poison: SamplingParams | None) -> dict[str, Any]:
    """The neighbours (one read whole, one streamed) and, with `poison`, two failing jobs: with
    3 rows at most, the first joins the neighbours' first step and the second takes its row
    once it has failed, while the neighbours run."""
    ids = {text: list(tok(text)["input_ids"]) for text in (PLAIN, STREAMED, *POISONED)}
    plain, streamed = (engine.submit(ids[t], NEIGHBOUR_PARAMS[t]) for t in (PLAIN, STREAMED))
    poisoned = [engine.submit(ids[t], poison) for t in POISONED] if poison else []
    engine.start()

    async def stream(job: Job) -> list[int]:
        return [token async for token in job.stream()]

    async def failure(job: Job, streaming: bool) -> BaseException | None:
        try:
            await (stream(job) if streaming else job.result())
        except Exception as exc:
            return exc
        return None

    try:
        got = await asyncio.gather(plain.result(), stream(streamed),
                                   *(failure(job, streaming=i == 1) for i, job in enumerate(poisoned)))
    finally:
        engine.stop(timeout=30)
    return {"plain": got[0].token_ids, "streamed": got[1], "errors": got[2:], "jobs": [plain, *poisoned],
            "finished": got[0]}


@pytest.mark.parametrize("attn,stage", [("sdpa", "seed"), ("sdpa", "draft"), ("sdpa", "sample"), ("sdpa", "stream"),
                                        ("eager", "seed"), ("eager", "sample")])
def test_a_failing_row_fails_alone_and_its_neighbours_finish_unchanged(models: dict[str, Any], tokenizer: Any,
                                                                        attn: str, stage: str) -> None:
    model = models[attn]
    alone = asyncio.run(_serve(Engine(model, tokenizer, max_batch_size=3, batch_wait_ms=0), tokenizer, None))
    ids = {tuple(tokenizer(t)["input_ids"]): FAULTS[stage] for t in POISONED} if stage in FAULTS else {}
    engine = PlantedEngine(model, tokenizer, max_batch_size=3, batch_wait_ms=0, faults=ids)
    with log_records("lmctl") as records:
        crowded = asyncio.run(_serve(engine, tokenizer, _poisoned_params(stage)))

    assert crowded["plain"] == alone["plain"] and len(alone["plain"]) == 24
    assert crowded["streamed"] == alone["streamed"] and len(alone["streamed"]) == 24
    expected = {"seed": ValueError, "draft": PlantedFault, "sample": TypeError, "stream": PlantedFault}[stage]
    assert all(isinstance(e, expected) for e in crowded["errors"]), crowded["errors"]
    plain_job, _first, second = crowded["jobs"]
    finished_at = plain_job.submitted + crowded["finished"].total_s
    assert second.admitted is not None and second.admitted < finished_at  # it failed beside running rows
    failures = [r for r in records if "failed alone" in r.getMessage()]
    assert len(failures) == 2 and not any("step failed" in r.getMessage() for r in records)


def test_over_http_a_failing_request_gets_its_error_and_the_others_their_text(
        tiny_base: Path, tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real server, with one request's draw and another's token streaming planted to fail:
    the plain one gets a 500 and the streamed one an error event, in OpenAI's shape, through the
    official SDK; the plain and streamed requests beside them get the text they get alone."""
    from lmctl.serve import build_app
    from lmctl.serve.settings import ServeSettings

    plant = {tuple(tokenizer(POISONED[0])["input_ids"]): _broken_generator,
             tuple(tokenizer(POISONED[1])["input_ids"]): FAULTS["stream"]}
    seed = Engine._seed

    def planted_seed(self: Engine, jobs: list[Job]) -> None:
        seed(self, jobs)
        for job in jobs:
            if (fault := plant.get(tuple(job.prompt_ids))) is not None and not job.done:
                fault(job)

    monkeypatch.setattr(Engine, "_seed", planted_seed)
    settings = ServeSettings(max_batch_size=3, batch_wait_ms=500, served_model_name="tiny")
    messages = [{"role": "user", "content": STREAMED}]
    with LiveServer(build_app(str(tiny_base), settings, [KEY]), free_port()) as srv:
        def client() -> openai.AsyncOpenAI:
            return openai.AsyncOpenAI(base_url=f"{srv.url}/v1", api_key=KEY, max_retries=0, timeout=120)

        async def plain(api: openai.AsyncOpenAI) -> str:
            reply = await api.completions.create(model="tiny", prompt=PLAIN, max_tokens=24, temperature=0)
            return reply.choices[0].text

        async def streamed(api: openai.AsyncOpenAI) -> str:
            chunks = await api.chat.completions.create(model="tiny", messages=messages, max_tokens=24,  # type: ignore[arg-type]
                                                       temperature=0.9, seed=7, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])

        async def poisoned(api: openai.AsyncOpenAI, prompt: str, stream: bool) -> BaseException | None:
            try:  # the first one samples (its draw is planted to fail), the second streams greedily
                reply = await api.completions.create(model="tiny", prompt=prompt, max_tokens=24,
                                                     temperature=0 if stream else 1.0, stream=stream)
                if stream:
                    async for _chunk in reply:  # type: ignore[union-attr]
                        pass
            except openai.APIError as exc:
                return exc
            return None

        async def alone() -> list[str]:
            async with client() as api:
                return list(await asyncio.gather(plain(api), streamed(api)))

        async def together() -> list[Any]:
            async with client() as api:
                return list(await asyncio.gather(plain(api), streamed(api), poisoned(api, POISONED[0], False),
                                                 poisoned(api, POISONED[1], True)))

        expected = asyncio.run(asyncio.wait_for(alone(), 120))
        with log_records("lmctl", "uvicorn.error") as records:
            got = asyncio.run(asyncio.wait_for(together(), 120))
        metrics = httpx.get(f"{srv.url}/metrics").text

    assert got[:2] == expected and all(expected)
    failed_plain, failed_stream = got[2:]
    assert isinstance(failed_plain, openai.InternalServerError) and failed_plain.status_code == 500
    assert failed_plain.body == {"message": "internal error", "type": "server_error", "code": None}
    assert isinstance(failed_stream, openai.APIError) and not isinstance(failed_stream, openai.APIStatusError)
    assert failed_stream.body == {"message": "internal error while generating", "type": "server_error", "code": None}
    assert re.search(r'lmctl_requests_total\{endpoint="completions",model="tiny",status="500",version="[^"]+"\} 2.0', metrics)
    assert sum("failed alone" in r.getMessage() for r in records) == 2


def test_a_conversation_the_chat_template_refuses_is_a_400(tiny_base: Path, tmp_path: Path) -> None:
    """Templates such as Gemma's raise on a system turn; the client learns why, as a 400."""
    import shutil

    from transformers import AutoTokenizer

    from lmctl.serve import build_app
    from lmctl.serve.settings import ServeSettings

    strict = tmp_path / "strict-template"
    shutil.copytree(tiny_base, strict)
    tok = AutoTokenizer.from_pretrained(strict)
    tok.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                         "{% endif %}" + tok.chat_template)
    tok.save_pretrained(strict)
    with LiveServer(build_app(str(strict), ServeSettings(served_model_name="tiny"), [KEY]), free_port()) as srv:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=KEY, max_retries=0, timeout=120)
        user = {"role": "user", "content": "Hi"}
        assert client.chat.completions.create(model="tiny", messages=[user], max_tokens=2).choices  # type: ignore[list-item]
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="tiny", messages=[{"role": "system", "content": "Be brief"}, user],  # type: ignore[list-item]
                                           max_tokens=2)
    assert refused.value.body == {"message": "the chat template of tiny refuses this conversation: System role not "
                                             "supported", "type": "invalid_request_error", "code": None}
