"""Choosing each row's next token from its logits.

transformers' temperature then top-p warper, then `torch.multinomial` with the job's own
`torch.Generator` (so a seed reproduces a completion whatever else is batched); temperature 0
is argmax, as `generate(do_sample=False)`. Written here rather than with transformers'
`LogitsProcessorList` because those warpers take one temperature and one top-p for the whole
batch, and each row of the engine's batch has its own.
"""

from __future__ import annotations

from typing import Any

from lmctl.serve.jobs import Job, failing_alone


def pick_next_tokens(logits: Any, jobs: list[Job]) -> list[int]:
    """One token per row: argmax for temperature 0, else temperature + top-p + the job's generator.
    A row whose own draw raises fails alone (its token is then the argmax, never streamed)."""
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
        with failing_alone(jobs[i]):
            tokens[i] = int(torch.multinomial(probs[k], 1, generator=jobs[i].generator))
    return tokens
