"""Perplexity, token-weighted across documents, with padding never scored.

Method (docs/perplexity.md): each document is tokenized without special
tokens and a prefix token (BOS, else EOS) is put in front, so its first token is scored
too, as lm-eval-harness does. Windows of at most `max_length` inputs then slide over the
document; each window scores only the tokens no earlier window scored, with everything
before them in the window as context.

- `strided`: a new window every `stride` tokens (overlap = max_length - stride gives each
  scored token at least that much context).
- `rolling`: stride = max_length, i.e. disjoint windows (lm-eval's loglikelihood_rolling).

The sums (NLL in nats, tokens, words, UTF-8 bytes) are returned so results aggregate.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from lmctl.errors import BadInputError


@dataclass(frozen=True)
class Window:
    doc: int
    input_ids: list[int]
    score_from: int  # first position in input_ids whose *next* token is scored
    targets: list[int]


class PerplexitySums(BaseModel):
    documents: int
    tokens: int
    words: int
    bytes: int
    nll_sum: float

    @property
    def metrics(self) -> dict[str, float]:
        return {
            "perplexity": math.exp(self.nll_sum / self.tokens),
            "word_perplexity": math.exp(self.nll_sum / self.words),
            "byte_perplexity": math.exp(self.nll_sum / self.bytes),
            "bits_per_byte": self.nll_sum / (self.bytes * math.log(2)),
            "nll_per_token": self.nll_sum / self.tokens,
        }


def make_windows(doc: int, ids: list[int], prefix: int, max_length: int, stride: int) -> list[Window]:
    """Windows over [prefix] + ids that together score every token of `ids` exactly once."""
    ext = [prefix] + ids
    windows = []
    for start in range(0, len(ids), stride):
        end = min(start + stride, len(ids))
        ctx = max(0, end - max_length)
        # ext[ctx:end] predicts ids[ctx:end]; only ids[start:end] are new.
        windows.append(Window(doc, ext[ctx:end], start - ctx, ids[start:end]))
    return windows


def _score_batch(model: Any, batch: list[Window], pad_id: int, device: Any) -> list[float]:
    import torch

    width = max(len(w.input_ids) for w in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, w in enumerate(batch):
        ids[row, : len(w.input_ids)] = torch.tensor(w.input_ids)
        mask[row, : len(w.input_ids)] = 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
    sums = []
    for row, w in enumerate(batch):
        span = logits[row, w.score_from : w.score_from + len(w.targets)]
        logprobs = torch.log_softmax(span, dim=-1)
        target = torch.tensor(w.targets, device=logprobs.device)
        sums.append(-float(logprobs.gather(1, target[:, None]).sum()))
    return sums


def perplexity(
    model: Any, tokenizer: Any, texts: list[str], max_length: int, stride: int, batch_size: int = 8
) -> tuple[PerplexitySums, list[float]]:
    """Score `texts`; returns the totals and the NLL of each document."""
    import torch

    if not 1 <= stride <= max_length:
        raise BadInputError(f"--stride {stride} must be between 1 and --max-length {max_length}")
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    windows = [w for i, ids in enumerate(encoded) for w in make_windows(i, list(ids), prefix, max_length, stride)]
    windows.sort(key=lambda w: len(w.input_ids), reverse=True)  # similar lengths share a batch: less padding
    doc_nll = [0.0] * len(texts)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with torch.inference_mode():
        for i in range(0, len(windows), batch_size):
            batch = windows[i : i + batch_size]
            for w, nll in zip(batch, _score_batch(model, batch, pad_id, device)):
                doc_nll[w.doc] += nll
    sums = PerplexitySums(
        documents=len(texts),
        tokens=sum(len(ids) for ids in encoded),
        words=sum(len(re.split(r"\s+", t)) for t in texts),
        bytes=sum(len(t.encode("utf-8")) for t in texts),
        nll_sum=sum(doc_nll),
    )
    return sums, doc_nll
