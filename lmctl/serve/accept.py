"""Which tokens a decode step keeps for each row: the sampled one, then the draft tokens the model
agreed with (prompt-lookup drafts are checked against the model's own argmax in the same
forward, so greedy output is exactly what one token per step would give). Rows that stop,
reach max_tokens, are cancelled, produced non-finite logits or whose own work raised
(lmctl.serve.jobs.failing_alone) leave the batch; the other rows go on."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lmctl.serve.batch import Batch, select_rows
from lmctl.serve.jobs import Job, failing_alone
from lmctl.serve.next_token import pick_next_tokens


class NonFiniteLogitsError(RuntimeError):
    """The model's output had NaN or inf for a row: that request fails, the batch goes on."""


@dataclass(frozen=True)
class Accepted:
    batch: Batch | None  # the rows still running
    drafted: int  # draft tokens the step fed
    agreed: int  # of those, the ones the model agreed with


def accept_tokens(batch: Batch, logits: Any, drafts: list[list[int]] | None,
                  dropped: Callable[[Job], bool]) -> Accepted:
    """Pick one token per row and stream it; a row that fed `drafts[row]` after its token (the
    logits then hold 1 + len(draft) positions for it) also streams each draft token the
    model's own argmax agreed with, and the model's token after the last of them. Finishes
    rows that are done and drops them. With `drafts` (the ragged step), positions advance
    by what each row kept and its rejected draft columns are masked out."""
    import torch

    starts = list(itertools.accumulate((1 + len(d) for d in drafts or []), initial=0))
    fed_drafts = drafts is not None and starts[-1] > len(drafts)
    first = _finite(logits[starts[:-1]] if fed_drafts else logits, batch.jobs)
    tokens = pick_next_tokens(first, batch.jobs)
    greedy = logits.argmax(dim=-1).tolist() if fed_drafts else []
    keep, kept_drafts, last = [], [], []
    for row, (job, token) in enumerate(zip(batch.jobs, tokens)):
        out = [token]
        with failing_alone(job):  # every row still gets its `last` and `kept_drafts` entries
            out = _agreed(token, drafts[row] if drafts else [], greedy, starts[row] if drafts else 0)
            if stream(job, out, dropped):
                keep.append(row)
        kept_drafts.append(len(out) - 1)
        last.append(out[-1])
    batch.last = torch.tensor(last, dtype=torch.long, device=logits.device)
    if drafts is not None:
        kept = torch.tensor(kept_drafts, device=logits.device)
        batch.pos = batch.pos + 1 + kept
        width = max(len(d) for d in drafts) + 1  # this step's columns, the last of the mask
        batch.mask[:, -width:] *= torch.arange(width, device=logits.device)[None] <= kept[:, None]
    return Accepted(select_rows(batch, keep), starts[-1] - len(drafts or []), sum(kept_drafts))


def _agreed(token: int, draft: list[int], greedy: list[int], start: int) -> list[int]:
    """The sampled token, then each draft token the model's argmax agreed with and the model's
    token after the last of them (guess j was fed after out[j]; greedy[start + j + 1] is what
    the model says follows it)."""
    out = [token]
    for j, guess in enumerate(draft):
        if guess != out[j]:
            break
        out.append(greedy[start + j + 1])
    return out


def _finite(logits: Any, jobs: list[Job]) -> Any:
    """A diverged adapter (NaN/inf weights) must fail its requests, not stream argmax garbage
    or crash torch.multinomial for every row it shares the batch with."""
    import torch

    broken = (~torch.isfinite(logits).all(dim=-1)).tolist()
    if not any(broken):
        return logits
    for job, bad in zip(jobs, broken):
        if bad:
            job._finish("cancelled", NonFiniteLogitsError("the model produced non-finite logits"))
    return torch.where(torch.isfinite(logits), logits, torch.zeros_like(logits))


def stream(job: Job, tokens: list[int], dropped: Callable[[Job], bool]) -> bool:
    """Emit `tokens` in order until the job stops or reaches max_tokens; False once it is done."""
    for token in tokens:
        if dropped(job):
            return False
        if token in job.params.stop_token_ids:
            job._finish("stop")
            return False
        job._emit(token)
        if job.drafter is not None:
            job.drafter.extend([token])
        if len(job._tokens) >= job.params.max_tokens:
            job._finish("length")
            return False
    return True
