"""Dynamic (continuous) batching generation engine for `lmctl serve`.

One worker thread owns the model. Jobs wait in a bounded queue; the worker admits up to
`max_batch_size`, prefills newcomers together (left-padded, attention mask, position ids
counting real tokens) and decodes one token per step for every row with a KV cache that
appends into buffers grown by doubling (lmctl.serve.kvcache: transformers' DynamicCache copies
the whole cache every step). Newcomers join between decode steps: prefilled on their own
cache, whose rows are appended, left-padded, to the running one. Finished or cancelled rows
leave at once (`batch_select_indices`) and all-padding columns are dropped, so compute
follows live rows. Attention uses torch's grouped-query SDPA (kvcache.use_gqa_attention).
Sampling is transformers' temperature then top-p warper, then `torch.multinomial` with the
job's own `torch.Generator`; temperature 0 is argmax, as `generate(do_sample=False)`.

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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lmctl.serve.jobs import Completion, EngineStoppedError, Job, QueueFullError, SamplingParams

__all__ = ["Completion", "Engine", "EngineStoppedError", "Job", "NonFiniteLogitsError", "QueueFullError", "SamplingParams"]


class NonFiniteLogitsError(RuntimeError):
    """The model's output had NaN or inf for a row: that request fails, the batch goes on."""

log = logging.getLogger("lmctl.serve.engine")
@dataclass
class _Batch:
    """The running rows; row i of every tensor (and of the cache) belongs to jobs[i]."""

    jobs: list[Job]
    cache: Any  # GrowingCache, batch x heads x mask.shape[1] x head_dim per layer
    mask: Any  # (B, L) attention mask, 0 on left padding
    last: Any  # (B,) last sampled token, the next decode input
    pos: Any  # (B,) position id of that token


class Engine:
    def __init__(self, model: Any, tokenizer: Any, max_batch_size: int = 8, max_queue: int = 64,
                 batch_wait_ms: float = 5.0, kv_budget_tokens: int | None = None) -> None:
        if max_batch_size < 1 or max_queue < 0 or batch_wait_ms < 0 or (kv_budget_tokens or 1) < 1:
            raise ValueError("max_batch_size and kv_budget_tokens must be >= 1, max_queue and batch_wait_ms >= 0")
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
        from lmctl.serve.kvcache import use_gqa_attention

        use_gqa_attention(model)  # same numbers as sdpa, without expanding grouped K/V every step
        self._cv = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._active: list[Job] = []  # rows of the current batch (what `running` counts)
        self._state = "new"  # new -> running -> stopping -> stopped
        self._drain = True
        self._abort = False  # stop(drain=False): every row still running ends at the next step
        self._thread: threading.Thread | None = None
        # Counters for metrics and tests (written by the worker only).
        self.forward_passes = 0  # prefills + decode steps
        self.peak_batch = 0  # most rows ever decoded together

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

        batch: _Batch | None = None
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

    def _step(self, batch: _Batch | None, newcomers: list[Job]) -> _Batch | None:
        """Prefill newcomers into the batch, then decode one token for every row. A model error
        fails only the jobs in the forward that raised it; the engine keeps serving."""
        if newcomers:
            try:
                batch = self._merge(batch, self._prefill(newcomers))
            except Exception as exc:
                log.exception("prefill failed for %d job(s)", len(newcomers))
                for job in newcomers:
                    job._finish("cancelled", exc)
        if batch is not None:
            self._active = list(batch.jobs)
            try:
                batch = self._decode(batch)
            except Exception as exc:
                log.exception("decode step failed for %d job(s)", len(batch.jobs))
                for job in batch.jobs:
                    job._finish("cancelled", exc)
                batch = None
        self._active = list(batch.jobs) if batch else []
        return batch

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

    def _prefill(self, jobs: list[Job]) -> _Batch | None:
        import torch
        from lmctl.serve.kvcache import GrowingCache

        for job in jobs:
            job.generator = torch.Generator(device=self._device)
            job.generator.manual_seed(job.params.seed if job.params.seed is not None
                                      else random.SystemRandom().getrandbits(63))
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
        batch = _Batch(jobs=list(jobs), cache=cache, mask=mask, last=None, pos=mask.sum(-1))
        return self._advance(batch, out.logits[:, -1, :])

    def _decode(self, batch: _Batch) -> _Batch | None:
        import torch

        batch = self._select(batch, [i for i, j in enumerate(batch.jobs) if not self._dropped(j)])
        if batch is None:
            return None
        ones = torch.ones((len(batch.jobs), 1), dtype=batch.mask.dtype, device=batch.mask.device)
        batch.mask = torch.cat([batch.mask, ones], dim=-1)
        out = self.model(input_ids=batch.last[:, None], attention_mask=batch.mask, position_ids=batch.pos[:, None],
                         past_key_values=batch.cache, use_cache=True)
        self.forward_passes += 1
        self.peak_batch = max(self.peak_batch, len(batch.jobs))
        batch.pos = batch.pos + 1
        return self._advance(batch, out.logits[:, -1, :])

    def _dropped(self, job: Job) -> bool:
        if job.cancel_requested or self._abort:
            job._finish("cancelled")
        return job.done

    def _advance(self, batch: _Batch, logits: Any) -> _Batch | None:
        """Sample one token per row, stream it, finish rows that are done and drop them."""
        import torch

        # A diverged adapter (NaN/inf weights) must fail its requests, not stream argmax garbage
        # or crash torch.multinomial for every row it shares the batch with.
        broken = (~torch.isfinite(logits).all(dim=-1)).tolist()
        if any(broken):
            logits = torch.where(torch.isfinite(logits), logits, torch.zeros_like(logits))
            for job, bad in zip(batch.jobs, broken):
                if bad:
                    job._finish("cancelled", NonFiniteLogitsError("the model produced non-finite logits"))
        tokens = _sample(logits, batch.jobs)
        keep = []
        for row, (job, token) in enumerate(zip(batch.jobs, tokens)):
            if self._dropped(job):
                continue
            if token in job.params.stop_token_ids:
                job._finish("stop")
                continue
            job._emit(token)
            if len(job._tokens) >= job.params.max_tokens:
                job._finish("length")
                continue
            keep.append(row)
        batch.last = torch.tensor(tokens, dtype=torch.long, device=logits.device)
        return self._select(batch, keep)

    def _select(self, batch: _Batch, keep: list[int]) -> _Batch | None:
        """Keep only rows `keep`, then trim the columns that are now padding in every row."""
        import torch

        if not keep:
            return None
        if len(keep) < len(batch.jobs):
            index = torch.tensor(keep, device=batch.mask.device)
            batch.cache.batch_select_indices(index)
            batch.jobs = [batch.jobs[i] for i in keep]
            batch.mask, batch.last, batch.pos = batch.mask[index], batch.last[index], batch.pos[index]
            lead = int(batch.mask.any(dim=0).int().argmax())  # first column any row attends to
            if lead > 0:
                batch.mask = batch.mask[:, lead:]
                batch.cache.drop_leading(lead)
        return batch

    def _merge(self, old: _Batch | None, new: _Batch | None) -> _Batch | None:
        """Concatenate two batches, left-padding the shorter one's mask and cache with zeros."""
        import torch
        from torch.nn.functional import pad

        if old is None or new is None:
            return new if old is None else old
        width = max(old.mask.shape[1], new.mask.shape[1])
        grow_old, grow_new = width - old.mask.shape[1], width - new.mask.shape[1]
        old.cache.append_rows(new.cache)
        old.mask = torch.cat([pad(old.mask, (grow_old, 0)), pad(new.mask, (grow_new, 0))])
        old.jobs = old.jobs + new.jobs
        old.last, old.pos = torch.cat([old.last, new.last]), torch.cat([old.pos, new.pos])
        return old


def _sample(logits: Any, jobs: list[Job]) -> list[int]:
    """One token per row: argmax for temperature 0, else temperature + top-p + the job's generator."""
    import torch

    logits = logits.float()
    tokens = logits.argmax(dim=-1).tolist()
    rows = [i for i, job in enumerate(jobs) if job.params.temperature > 0 and not job.done]
    if not rows:
        return tokens
    index = torch.tensor(rows, device=logits.device)
    # A floor keeps logits / T finite (a tiny T is greedy in all but name; inf would make NaNs).
    temps = torch.tensor([max(jobs[i].params.temperature, 1e-5) for i in rows], device=logits.device)[:, None]
    top_p = torch.tensor([jobs[i].params.top_p for i in rows], device=logits.device)[:, None]
    scores = logits[index] / temps
    if bool((top_p < 1).any()):  # transformers' TopPLogitsWarper, one threshold per row
        ascending, order = scores.sort(dim=-1)
        drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        drop[:, -1] = False  # always keep the most likely token
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = scores.softmax(dim=-1)
    for k, i in enumerate(rows):
        tokens[i] = int(torch.multinomial(probs[k], 1, generator=jobs[i].generator))
    return tokens
