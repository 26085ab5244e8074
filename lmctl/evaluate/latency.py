"""Generation latency: end-to-end p50/p95/p99, time to first token, decode tokens/s.

Prompts are the first `prompt_tokens` tokens of the data's documents (cycled), each
request generates exactly `output_tokens` tokens greedily, one request at a time. Time to
first token is taken when the first logits processor call runs, i.e. right after the
prompt's forward pass (on CUDA the clock waits for the device: a synchronize before each
read). One warm-up request is not counted.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from lmctl.distributed import synchronized_now

if TYPE_CHECKING:
    from lmctl.data.documents import Document


class LatencyReport(BaseModel):
    runs: int
    prompt_tokens: int
    output_tokens: int
    latency_ms: dict[str, float]  # p50, p95, p99, mean
    ttft_ms: dict[str, float]
    decode_tokens_per_s: float
    input_tokens: dict[str, float]  # length of the data's documents: p50, p95, max, mean
    samples_ms: list[float]  # every measured request, for distributions


def percentiles(values: list[float]) -> dict[str, float]:
    """p50/p95/p99 (lmctl.stats.percentiles, the one definition) and the mean."""
    from lmctl import stats

    p50, p95, p99 = stats.percentiles(values, (0.5, 0.95, 0.99))
    return {"p50": p50, "p95": p95, "p99": p99, "mean": sum(values) / len(values)}


class _FirstToken:
    """A logits processor that only notes when it is first called (the first new token), once
    the prompt's forward has run on the device (lmctl.distributed.synchronized_now)."""

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        if self.at is None:
            self.at = synchronized_now(scores.device)
        return scores


def measure(model: Any, tokenizer: Any, docs: Iterable[Document], prompt_tokens: int, output_tokens: int,
            runs: int) -> LatencyReport:
    """Latency of `runs` generations whose prompts repeat the first documents' tokens up to
    prompt_tokens; input_tokens describes every document (read once, as they stream)."""
    import torch
    from transformers import LogitsProcessorList

    lengths: list[float] = []
    pool: list[list[int]] = []
    for doc in docs:
        if doc.ids:
            lengths.append(float(len(doc.ids)))
            if len(pool) <= runs:  # only the first runs + 1 prompts are ever used
                pool.append(doc.ids * (prompt_tokens // len(doc.ids) + 1))
    device = next(model.parameters()).device
    totals, ttfts = [], []
    for i in range(runs + 1):
        ids = torch.tensor([pool[i % len(pool)][:prompt_tokens]], device=device)
        first = _FirstToken()
        start = synchronized_now(device)
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_tokens,
                           min_new_tokens=output_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                           logits_processor=LogitsProcessorList([first]))
        end = synchronized_now(device)
        if i == 0:
            continue  # warm-up
        totals.append((end - start) * 1000)
        ttfts.append(((first.at or end) - start) * 1000)
    decode_s = sum(t - f for t, f in zip(totals, ttfts)) / 1000
    stats = percentiles(lengths)
    return LatencyReport(
        runs=runs, prompt_tokens=prompt_tokens, output_tokens=output_tokens,
        latency_ms={k: round(v, 2) for k, v in percentiles(totals).items()},
        ttft_ms={k: round(v, 2) for k, v in percentiles(ttfts).items()},
        decode_tokens_per_s=round(runs * (output_tokens - 1) / decode_s, 2) if decode_s > 0 else 0.0,
        input_tokens={"p50": stats["p50"], "p95": stats["p95"], "max": max(lengths), "mean": round(stats["mean"], 2)},
        samples_ms=[round(t, 2) for t in totals],
    )
