"""Perplexity, token-weighted across documents, with padding never scored.

Method (docs/perplexity.md): each document is tokenized without special
tokens and a prefix token (BOS, else EOS) is put in front, so its first token is scored
too, as lm-eval-harness does. Windows of at most `max_length` inputs then slide over the
document; each window scores only the tokens no earlier window scored, with everything
before them in the window as context.

- `strided`: a new window every `stride` tokens (overlap = max_length - stride gives each
  scored token at least that much context).
- `rolling`: stride = max_length, i.e. disjoint windows (lm-eval's loglikelihood_rolling).

Memory and speed (why this is not `model(...).logits` + `log_softmax`): a 49k vocabulary
makes `batch x window x vocab` fp32 logits, plus a log-softmax copy, the largest tensors by
far (1.6 GB at batch 8, window 1024), and a strided window scores only `stride` of its
positions. So the model's body runs on the window and the output head runs only on the
scored positions, as many at a time as fit a byte budget (lmctl.chunked_loss.chunk_rows:
256 MiB on the CPU, an eighth of the free memory up to 1 GiB on a GPU), straight into
`cross_entropy`. Models that transform their logits (soft-capping, lmctl.chunked_loss.
LOGIT_TRANSFORMS) run their full forward instead, so the numbers stay the model's own; the
batch size then counts their full logits too. Documents
(lmctl.data.documents: tokenized from the cache, or a chunk at a time) are cut into
windows as they stream by: memory holds one look-ahead buffer of
windows and the per-document sums, whatever the number of documents. The batch size
comes from a memory budget (`auto_batch_size`), not a fixed count. transformers has no
scorer that does this (its `logits_to_keep` keeps the same positions in every row, and
lm-eval materialises the full logits), hence the code here.

The sums (NLL in nats, tokens, words, UTF-8 bytes) are returned so results aggregate.

Sharded (`lmctl eval` under torchrun, docs/perplexity.md): every rank cuts the same
windows into the same batches, scores the batches it owns (batch j on rank j % size) and
the per-window NLLs are gathered and added up in batch order, exactly as one process adds
them: the batches, and so the floating-point work, are those of a one-process run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from pydantic import BaseModel

from lmctl import chunked_loss
from lmctl.data.documents import Document, tokenize_documents
from lmctl.distributed import World
from lmctl.errors import BadInputError

log = logging.getLogger("lmctl.eval")
LOOKAHEAD_BATCHES = 16  # windows are sorted by length within this many batches, to cut padding
# A window joins a batch only if it is at least this share of the batch's longest: padded
# positions cost a full forward each and make attention take a masked (non-causal) kernel.
# rolling over documents of 2.6k, 1.2k and 259 tokens at window 1024 and batch 2 paired the
# 259-token window with a 1024 one: 14% of all forwarded tokens were padding.
MIN_LENGTH_SHARE = 0.9


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


@dataclass
class Scored:
    """The totals, plus each document's NLL and token count in input order."""

    sums: PerplexitySums
    doc_nll: list[float] = field(default_factory=list)
    doc_tokens: list[int] = field(default_factory=list)
    batch_size: int = 0  # windows per forward actually used


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


def auto_batch_size(model: Any, max_length: int, budget_bytes: int | None = None) -> int:
    """Windows per forward that keep the body's transient activations within a budget.

    Per token and layer, a forward without a KV cache holds the residual stream, q/k/v/o,
    the MLP's three intermediate tensors and (worst case, a padded batch takes the math
    attention kernel) one row of attention scores per head. Default budget: 384 MiB on CPU
    (more rows buy little there: a 1024-token window is already a compute-bound GEMM), half
    the free memory on a GPU. A model whose forward transforms its logits (those skip the
    scored-positions head) also holds its full logits: the head's output and an fp32 copy."""
    import torch

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = int(config.hidden_size)
    inter = int(getattr(config, "intermediate_size", 4 * hidden) or 4 * hidden)
    heads = int(config.num_attention_heads)
    itemsize = next(model.parameters()).element_size()
    per_token = itemsize * (6 * hidden + 3 * inter + heads * max_length) * 2  # x2: allocator slack, temporaries
    if chunked_loss.transforms_logits(config) is not None:
        per_token += int(config.vocab_size) * (itemsize + 4)
    if budget_bytes is None:
        device = next(model.parameters()).device
        budget_bytes = torch.cuda.mem_get_info(device)[0] // 2 if device.type == "cuda" else 384 << 20
    return max(1, min(256, budget_bytes // (per_token * max_length)))


def _head_only_at_scored(model: Any) -> tuple[Any, Any] | None:
    """(body, head) when logits are exactly head(body(x)), so the head can run on chosen rows."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PeftModel -> HF model
    peft = getattr(model, "active_peft_config", None)
    if peft is not None and getattr(peft, "is_prompt_learning", False):
        return None  # prompt-learning adapters add virtual tokens in PeftModel.forward itself
    config = getattr(base, "config", None)
    if config is None or chunked_loss.transforms_logits(config) is not None:
        return None
    get_decoder, head = getattr(base, "get_decoder", None), base.get_output_embeddings()
    return (get_decoder(), head) if get_decoder is not None and head is not None else None


def _score_batch(model: Any, parts: tuple[Any, Any] | None, batch: list[Window], pad_id: int,
                 device: Any) -> list[float]:
    """Summed NLL of each window's targets; the head sees only scored positions, in chunks."""
    import torch
    from torch.nn.functional import cross_entropy

    width = max(len(w.input_ids) for w in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    rows, cols, targets = [], [], []
    for row, w in enumerate(batch):
        ids[row, : len(w.input_ids)] = torch.tensor(w.input_ids)
        mask[row, : len(w.input_ids)] = 1
        rows += [row] * len(w.targets)
        cols += range(w.score_from, w.score_from + len(w.targets))
        targets += w.targets
    # Without padding no mask is passed: attention then takes the causal kernel, not a built mask.
    ids, mask = ids.to(device), (mask.to(device) if int(mask.sum()) < mask.numel() else None)
    if parts is not None:
        body, head = parts
        states = body(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    else:
        states, head = model(input_ids=ids, attention_mask=mask, use_cache=False).logits, None
    row_t, col_t = torch.tensor(rows, device=device), torch.tensor(cols, device=device)
    target_t = torch.tensor(targets, device=device)
    nll = torch.zeros(len(batch), dtype=torch.float64, device=device)
    vocab = states.shape[-1] if head is None else getattr(head, "out_features", None) or head.weight.shape[0]
    chunk = chunked_loss.chunk_rows(vocab, states.element_size(), device)
    for i in range(0, len(targets), chunk):
        r, c = row_t[i : i + chunk], col_t[i : i + chunk]
        logits = (head(states[r, c]) if head is not None else states[r, c]).float()
        losses = cross_entropy(logits, target_t[i : i + chunk], reduction="none")
        nll.index_add_(0, r, losses.double())
    return nll.tolist()


def _windows(docs: Iterable[Document], prefix: int, max_length: int, stride: int, stats: Scored) -> Iterator[Window]:
    """Windows of each document as it streams by; record the per-document sums."""
    for d in docs:
        doc = len(stats.doc_tokens)
        stats.doc_tokens.append(len(d.ids))
        stats.doc_nll.append(0.0)
        stats.sums.words += d.words
        stats.sums.bytes += d.bytes
        yield from make_windows(doc, d.ids, prefix, max_length, stride)


def _batches(windows: Iterator[Window], batch_size: int) -> Iterator[list[Window]]:
    """Batches of at most `batch_size` similar-length windows (each at least MIN_LENGTH_SHARE
    of its batch's longest), sorted within a bounded look-ahead buffer."""
    while buffer := list(islice(windows, batch_size * LOOKAHEAD_BATCHES)):
        buffer.sort(key=lambda w: len(w.input_ids), reverse=True)
        batch: list[Window] = []
        for w in buffer:
            if batch and (len(batch) == batch_size or len(w.input_ids) < MIN_LENGTH_SHARE * len(batch[0].input_ids)):
                yield batch
                batch = []
            batch.append(w)
        yield batch


def perplexity(model: Any, tokenizer: Any, texts: Iterable[str], max_length: int, stride: int,
               batch_size: int | None = None) -> Scored:
    """Score `texts` (any iterable: read once, as it streams); batch_size None = from the budget."""
    return score_documents(model, tokenizer, tokenize_documents(texts, tokenizer), max_length, stride, batch_size)


def score_documents(model: Any, tokenizer: Any, docs: Iterable[Document], max_length: int, stride: int,
                    batch_size: int | None = None, world: World = World()) -> Scored:
    """Score documents already tokenized (lmctl.data.documents: from the cache, or as they stream).
    With a `world` of several ranks each scores its share of the batches and every rank
    returns the whole result, the same numbers one process computes with the same batch size."""
    import torch

    if not 1 <= stride <= max_length:
        raise BadInputError(f"--stride {stride} must be between 1 and --max-length {max_length}")
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    parts = _head_only_at_scored(model)
    # ranks must cut the same batches: each takes the smallest of their memory budgets' sizes
    size = batch_size or min(world.all_gather(auto_batch_size(model, max_length)))
    out = Scored(PerplexitySums(documents=0, tokens=0, words=0, bytes=0, nll_sum=0.0), batch_size=size)
    mine: list[tuple[int, tuple[list[int], list[float]]]] = []  # (batch index, (window docs, window NLLs))
    batches = 0
    with torch.inference_mode():
        for index, batch in enumerate(_batches(_windows(docs, prefix, max_length, stride, out), size)):
            if world.owns(index):
                mine.append((index, ([w.doc for w in batch], _score_batch(model, parts, batch, pad_id, device))))
            if world.world_size == 1:  # nothing to gather: add now, so memory holds no per-window list
                _add(out.doc_nll, *mine.pop()[1])
            batches = index + 1
    if world.world_size > 1:  # rank 0 speaks for all (other ranks log only warnings): each rank's share
        for rank, share in enumerate(world.all_gather(len(mine))):
            log.info("rank %d of %d scored %d of %d batches", rank, world.world_size, share, batches)
    for _, (window_docs, nlls) in world.in_order(mine):
        _add(out.doc_nll, window_docs, nlls)
    out.sums.documents, out.sums.tokens = len(out.doc_tokens), sum(out.doc_tokens)
    out.sums.nll_sum = math.fsum(out.doc_nll)
    return out


def _add(doc_nll: list[float], window_docs: list[int], nlls: list[float]) -> None:
    """Add one batch's window NLLs to their documents' sums (in window order: the same
    additions, in the same order, whether the batch was scored here or on another rank)."""
    for doc, nll in zip(window_docs, nlls):
        doc_nll[doc] += nll
