"""Dynamic (continuous) batching generation engine for `lmctl serve`.

One worker thread owns the model. Jobs wait in a bounded queue; the worker admits up to
`max_batch_size` (and what fits the KV budget) and decodes one token per step for every row
with a KV cache that appends into buffers grown by doubling (lmctl.serve.kvcache:
transformers' DynamicCache copies the whole cache every step). Newcomers prefill inside a
decode step: one forward over the running rows' next tokens and the newcomers' prompts laid
flat (lmctl.serve.ragged), after which their cache rows are appended, left-padded, to the
running one. (A model whose attention the engine does not own, eager or flash, prefills
newcomers in a left-padded pass of their own first.) Position ids count real tokens, as
`generate` does. Finished or cancelled rows leave at once (`batch_select_indices`) and
all-padding columns are dropped, so compute follows live rows. Attention is torch's
grouped-query SDPA (kvcache.use_gqa_attention). Sampling: lmctl.serve.next_token.
One request cannot fail its neighbours: what a row's own work raises (seeding its generator,
its draft, its draw, accepting and streaming its tokens) ends that job alone
(lmctl.serve.jobs.failing_alone); only a batched forward that raises fails a step's jobs.

Why not transformers 5.17's continuous batching (`generate_batch`, `init_continuous_batching`,
`ContinuousBatchingManager`)? From its source: `do_sample` is manager-wide (greedy and sampled
requests cannot share a batch); sampling uses the global torch RNG (no per-request generator;
the manager calls `torch.manual_seed`), so a request's seed cannot give the same text
whatever else is batched; it switches the shared model to a `paged|...` attention in place;
and a full queue blocks `add_request` 10 s, then drops the request with a warning. So the
loop is written here over transformers' cache API and forward; at scale, vLLM.
"""

from __future__ import annotations

import collections
import inspect
import itertools
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from lmctl.serve.accept import NonFiniteLogitsError, accept_tokens
from lmctl.serve.batch import Batch, merge_batches, select_rows, squeeze_columns
from lmctl.serve.jobs import Completion, EngineStoppedError, Job, QueueFullError, SamplingParams, failing_alone

__all__ = ["Completion", "Engine", "EngineStoppedError", "Job", "NonFiniteLogitsError", "QueueFullError", "SamplingParams"]


log = logging.getLogger("lmctl.serve.engine")


class Engine:
    def __init__(self, model: Any, tokenizer: Any, max_batch_size: int = 8, max_queue: int = 64,
                 batch_wait_ms: float = 5.0, kv_budget_tokens: int | None = None, draft_tokens: int = 3,
                 draft_rows: int | None = None) -> None:
        if (max_batch_size < 1 or max_queue < 0 or batch_wait_ms < 0 or (kv_budget_tokens or 1) < 1
                or draft_tokens < 0):
            raise ValueError("max_batch_size and kv_budget_tokens must be >= 1, max_queue, batch_wait_ms and "
                             "draft_tokens >= 0")
        self.draft_tokens = draft_tokens  # prompt-lookup drafts per greedy row and step (lmctl.serve.drafts)
        self.model, self.tokenizer = model, tokenizer
        self.kv_budget_tokens = kv_budget_tokens  # None: no memory bound beyond max_batch_size
        self.max_batch_size, self.max_queue, self.batch_wait_s = max_batch_size, max_queue, batch_wait_ms / 1000
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._pad_id = int(pad or 0)  # masked everywhere, so any valid id does
        self._vocab = int(model.get_input_embeddings().num_embeddings)
        self._max_positions: int | None = getattr(model.config, "max_position_embeddings", None)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PeftModel -> HF model
        # Prefill needs only the last position's logits (a 49k-vocab head over every prompt token is waste).
        keep_last = "logits_to_keep" in inspect.signature(base.forward).parameters
        self._logits_kw = {"logits_to_keep": 1} if keep_last else {}
        self._device = next(model.parameters()).device
        from lmctl.serve.kvcache import CPU_DRAFT_ROWS, GPU_DRAFT_ROWS, attention_kernel, use_gqa_attention
        from lmctl.serve.ragged import full_attention_only

        if draft_rows is None:  # drafts only in a batch of at most this many rows (measured: kvcache)
            draft_rows = GPU_DRAFT_ROWS if self._device.type == "cuda" else CPU_DRAFT_ROWS
        self.draft_rows = draft_rows
        # Same numbers as sdpa without expanding grouped K/V every step; and where the engine owns
        # the attention of full-attention layers, newcomers prefill inside a decode step (ragged.py).
        owned = use_gqa_attention(model)
        self._ragged = owned and full_attention_only(base.config)
        self.attention_kernel = attention_kernel(self._device.type, owned, str(base.config._attn_implementation))
        self._cv = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._active: list[Job] = []  # rows of the current batch (what `running` counts)
        self._state = "new"  # new -> running -> stopping -> stopped
        self._drain = True
        self._abort = False  # stop(drain=False): every row still running ends at the next step
        self._thread: threading.Thread | None = None
        # Counters for metrics and tests (written by the worker only).
        self.forward_passes = 0  # prefills + decode steps
        self.drafted = self.accepted = 0  # draft tokens fed to the model, and those it agreed with
        self.peak_batch = 0  # most rows ever decoded together

    @property
    def device(self) -> Any:
        """The torch device of the model's weights (where every step's tensors are made)."""
        return self._device

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._active)

    def start(self) -> None:
        with self._cv:
            if self._state != "new":
                raise RuntimeError(f"engine is {self._state}; start() runs once")
            self._state = "running"
            self._thread = threading.Thread(target=self._run, name="lmctl-engine", daemon=True)
            self._thread.start()

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking jobs. drain=True finishes queued and running jobs first (at most `timeout`
        seconds; then the rest are cancelled); drain=False cancels them at the next step."""
        with self._cv:
            if self._state in ("new", "stopped"):
                self._state = "stopped"
                self._cancel_waiting()
                return
            self._state, self._drain = "stopping", self._drain and drain
            if not drain:
                self._abort = True
                self._cancel_waiting()
            self._cv.notify_all()
        assert self._thread is not None
        self._thread.join(timeout)
        if self._thread.is_alive():  # drain ran out of time: cancel what is left, then wait for the step
            self.stop(drain=False)

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams) -> Job:
        """Queue a job (thread-safe, never blocks on the model). QueueFullError when max_queue jobs
        wait, EngineStoppedError after stop(), ValueError for a prompt the model cannot take."""
        ids = [int(t) for t in prompt_ids]
        if not ids:
            raise ValueError("the prompt has no tokens")
        if min(ids) < 0 or max(ids) >= self._vocab:
            raise ValueError(f"prompt token ids must be in [0, {self._vocab})")
        if self._max_positions and len(ids) + params.max_tokens > self._max_positions:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                             f"model's {self._max_positions} positions")
        job = Job(self, ids, params)
        with self._cv:
            if self._state in ("stopping", "stopped"):
                raise EngineStoppedError("the engine is stopping and takes no new requests")
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append(job)
            self._cv.notify_all()
        return job

    # -- internals -----------------------------------------------------------------------
    def _cancel(self, job: Job) -> None:
        with self._cv:
            if job in self._waiting:
                self._waiting.remove(job)
                job._finish("cancelled")
                return
        job.cancel_requested = True

    def _cancel_waiting(self) -> None:  # caller holds self._cv
        while self._waiting:
            self._waiting.popleft()._finish("cancelled")

    def _run(self) -> None:
        import torch

        batch: Batch | None = None
        try:
            with torch.inference_mode():
                while (newcomers := self._admit(batch.jobs if batch else [])) is not None:
                    batch = self._step(batch, newcomers)
        except BaseException as exc:  # a bug in the loop itself: fail everything, never hang clients
            log.exception("generation engine crashed")
            for job in [*self._active, *self._waiting]:
                job._finish("cancelled", exc)
            raise
        finally:
            with self._cv:
                self._state = "stopped"
                self._active = []
                self._cancel_waiting()

    def _step(self, batch: Batch | None, newcomers: list[Job]) -> Batch | None:
        """Decode one token for every row and prefill the newcomers: in one ragged forward where the
        engine owns the attention, else a prefill pass of their own merged in before the decode
        step. What one row's own work raises fails that job alone (jobs.failing_alone); a failure
        of a batched forward fails the jobs in that forward, and the engine goes on."""
        if self._ragged:
            jobs = [*(batch.jobs if batch else []), *newcomers]
            batch = self._all_or_none("decode step", jobs, partial(self._ragged_step, batch, newcomers))
        else:
            if newcomers:
                batch = merge_batches(batch, self._all_or_none("prefill", newcomers, partial(self._prefill, newcomers)))
            if batch is not None:
                self._active = list(batch.jobs)
                batch = self._all_or_none("decode step", self._active, partial(self._decode, batch))
        self._active = list(batch.jobs) if batch else []
        return batch

    def _all_or_none(self, what: str, jobs: list[Job], work: Callable[[], Batch | None]) -> Batch | None:
        """`work()`, a step around one batched forward; if it raises, every job in it fails with
        that error and no row goes on (their cache rows are in an unknown state)."""
        try:
            return work()
        except Exception as exc:
            log.exception("%s failed for %d job(s)", what, len(jobs))
            for job in jobs:
                job._finish("cancelled", exc)
            return None

    def _admit(self, running: list[Job]) -> list[Job] | None:
        """Jobs to add to the batch now ([] = keep decoding), or None when it is time to exit.
        An idle worker waits up to batch_wait_ms for a fuller first batch; a busy one never waits."""
        active = len(running)
        with self._cv:
            while True:
                room = self.max_batch_size - active
                if self._waiting and room > 0:
                    if active == 0 and len(self._waiting) < room and self.batch_wait_s > 0:
                        deadline = time.monotonic() + self.batch_wait_s
                        while len(self._waiting) < room and self._state == "running":
                            left = deadline - time.monotonic()
                            if left <= 0 or not self._cv.wait(left):
                                break
                        if not self._waiting:  # all cancelled meanwhile
                            continue
                    take = self._fits(running) - active  # 0: the queue's head waits for KV memory
                    if take > 0:
                        now = time.perf_counter()
                        taken = [self._waiting.popleft() for _ in range(take)]
                        for job in taken:
                            job.admitted = now
                        return taken
                if active:
                    return []
                if self._state == "stopping":
                    return None
                self._cv.wait()

    def _fits(self, running: list[Job]) -> int:
        """How many rows the batch may hold once the next waiting jobs (FIFO) join: at most
        max_batch_size, and the padded cache (rows x the longest prompt + max_tokens) within
        kv_budget_tokens. A lone job always fits (submit() checked it against the context)."""
        rows = list(running)
        for job in itertools.islice(self._waiting, self.max_batch_size - len(rows)):
            need = (len(rows) + 1) * max(j.prompt_tokens + j.params.max_tokens for j in [*rows, job])
            if rows and self.kv_budget_tokens is not None and need > self.kv_budget_tokens:
                break
            rows.append(job)
        return len(rows)

    def _seed(self, jobs: list[Job]) -> None:
        import torch
        from lmctl.serve.drafts import NgramDrafter

        for job in jobs:
            with failing_alone(job):  # a job whose set-up raises is done, and not in the forward
                greedy = self.draft_tokens and self._ragged and job.params.temperature == 0
                job.drafter = NgramDrafter(job.prompt_ids) if greedy else None
                job.generator = torch.Generator(device=self._device)
                job.generator.manual_seed(job.params.seed if job.params.seed is not None
                                          else random.SystemRandom().getrandbits(63))

    def _ragged_step(self, batch: Batch | None, newcomers: list[Job]) -> Batch | None:
        """One forward over the running rows' next tokens (each followed by its draft tokens) and
        the newcomers' whole prompts, laid flat (lmctl.serve.ragged); the newcomers' cache then
        joins the batch's, left-padded."""
        import torch
        from lmctl.serve.ragged import RAGGED_KWARG, RaggedStep, decode_mask

        self._seed(newcomers)
        newcomers = [job for job in newcomers if not job.done]
        if (batch := self._without_dropped(batch)) is None and not newcomers:
            return None  # the last row was cancelled (a stop string ended it): a forward needs rows
        running = batch.jobs if batch else []
        self._active = [*running, *newcomers]
        drafts = self._drafts(running)
        queries, lengths, dev = [1 + len(d) for d in drafts], [job.prompt_tokens for job in newcomers], self._device
        ids = [t for row, draft in zip(batch.last.tolist() if batch else [], drafts) for t in (row, *draft)]
        ids += [t for job in newcomers for t in job.prompt_ids]
        positions = [p + j for p, q in zip(batch.pos.tolist() if batch else [], queries) for j in range(q)]
        positions += [j for n in lengths for j in range(n)]
        step = RaggedStep(batch.cache if batch else None, queries, lengths, dev)
        if batch is not None:  # this step's columns: a row's own tokens, then zeros up to the widest row
            fed = torch.arange(step.width_q, device=dev)[None] < torch.tensor(queries, device=dev)[:, None]
            batch.mask = torch.cat([batch.mask, fed.to(batch.mask.dtype)], dim=-1)
        keep = step.logit_positions()
        out = self.model(input_ids=torch.tensor([ids], device=dev), position_ids=torch.tensor([positions], device=dev),
                         attention_mask=decode_mask(batch.mask if batch else None, step.width_q).to(dev),
                         past_key_values=step, use_cache=True, **{RAGGED_KWARG: step},
                         **({"logits_to_keep": keep} if self._logits_kw else {}))
        logits = out.logits[0] if self._logits_kw else out.logits[0, keep]
        self.forward_passes += 1
        self.peak_batch = max(self.peak_batch, len(self._active))
        new = None
        if newcomers:
            new = Batch(jobs=list(newcomers), cache=step.prefilled, mask=step.prefilled_mask, last=None,
                         pos=torch.tensor(lengths, device=dev))
            new = self._advance(new, logits[step.decoded:])
        if batch is not None:
            batch = squeeze_columns(self._advance(batch, logits[:step.decoded], drafts))
        return merge_batches(batch, new)

    def _drafts(self, running: list[Job]) -> list[list[int]]:
        """Draft tokens for greedy rows (lmctl.serve.drafts), up to draft_tokens each, while the batch
        has at most draft_rows rows: every token fed makes the step slower for all of its rows, so
        in a fuller batch a request whose text does not repeat waits on the others' guesses."""
        drafts: list[list[int]] = [[] for _ in running]
        if len(running) > self.draft_rows:
            return drafts
        for row, job in enumerate(running):
            with failing_alone(job):  # its row rides this forward with no draft, then leaves
                drafts[row] = job.drafter.propose(self.draft_tokens) if job.drafter else []
        return drafts

    def _prefill(self, jobs: list[Job]) -> Batch | None:
        import torch
        from lmctl.serve.kvcache import GrowingCache

        self._seed(jobs)
        if not (jobs := [job for job in jobs if not job.done]):
            return None
        width = max(j.prompt_tokens for j in jobs)
        ids = torch.full((len(jobs), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for row, job in enumerate(jobs):  # left padding: every row's next token is in the last column
            ids[row, width - job.prompt_tokens:] = torch.tensor(job.prompt_ids)
            mask[row, width - job.prompt_tokens:] = 1
        ids, mask = ids.to(self._device), mask.to(self._device)
        # Positions count real tokens only, as generate() does, so padding never shifts RoPE.
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = GrowingCache()  # all full-attention layers: rows can be padded and concatenated
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True, **self._logits_kw)
        self.forward_passes += 1
        batch = Batch(jobs=list(jobs), cache=cache, mask=mask, last=None, pos=mask.sum(-1))
        return self._advance(batch, out.logits[:, -1, :])

    def _decode(self, batch: Batch) -> Batch | None:
        import torch

        if (batch := self._without_dropped(batch)) is None:
            return None
        ones = torch.ones((len(batch.jobs), 1), dtype=batch.mask.dtype, device=batch.mask.device)
        batch.mask = torch.cat([batch.mask, ones], dim=-1)
        out = self.model(input_ids=batch.last[:, None], attention_mask=batch.mask, position_ids=batch.pos[:, None],
                         past_key_values=batch.cache, use_cache=True)
        self.forward_passes += 1
        self.peak_batch = max(self.peak_batch, len(batch.jobs))
        batch.pos = batch.pos + 1
        return self._advance(batch, out.logits[:, -1, :])

    def _without_dropped(self, batch: Batch | None) -> Batch | None:
        """The batch without the rows cancelled (or aborted) since the last step."""
        if batch is None:
            return None
        return select_rows(batch, [i for i, job in enumerate(batch.jobs) if not self._dropped(job)])

    def _dropped(self, job: Job) -> bool:
        if job.cancel_requested or self._abort:
            job._finish("cancelled")
        return job.done

    def _advance(self, batch: Batch, logits: Any, drafts: list[list[int]] | None = None) -> Batch | None:
        """Accept each row's tokens (lmctl.serve.accept); rows that are done leave the batch."""
        accepted = accept_tokens(batch, logits, drafts, self._dropped)
        if drafts is not None:
            self.drafted, self.accepted = self.drafted + accepted.drafted, self.accepted + accepted.agreed
        return accepted.batch
